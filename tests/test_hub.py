"""Model card and Hub push. The push runs through huggingface_hub against a local stand-in for the Hub's HTTP API."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from run_dirs import make_run

from finetune import hub, merge
from finetune.card import model_card
from finetune.errors import FinetuneError

TOKEN = "hf_standinSECRETtoken0123456789abcdef"
EVAL = {
    "tasks": {
        "pubmedqa": {
            "n": 200,
            "base": 0.412,
            "adapter": 0.538,
            "delta": 0.126,
            "ci95": [0.071, 0.18],
            "metric": "accuracy",
            "kind": "mcq",
            "reader": "pubmedqa",
            "split": "test",
        },
        "medmcqa": {
            "n": 100,
            "groups": 25,  # as if four questions were asked of each of 25 documents
            "base": 0.3,
            "adapter": 0.29,
            "delta": -0.01,
            "ci95": [-0.06, 0.04],
            "metric": "accuracy",
            "kind": "mcq",
            "reader": "medmcqa",
            "split": "train",
        },
    }
}


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_llama_dir):
    run = make_run(tmp_path_factory.mktemp("hub") / "run", tiny_llama_dir, eval_json=EVAL)
    merge.merge(run)
    return run


def test_card_front_matter_eval_table_and_licenses(run_dir, tmp_path):
    card = model_card(run_dir, merged=True, repo_id="me/tiny")
    meta = front_matter(card)
    assert meta["library_name"] == "transformers"
    assert meta["pipeline_tag"] == "text-generation"
    assert "base_model" not in meta  # a local folder has no Hub id to link
    assert "| pubmedqa | 200 | 0.412 | 0.538 | +0.126 | [+0.071, +0.180] |" in card
    assert "| medmcqa | 100 in 25 docs | 0.300 | 0.290 | -0.010 | [-0.060, +0.040] |" in card
    assert 'AutoModelForCausalLM.from_pretrained("me/tiny")' in card
    assert "apply_chat_template" in card
    assert "- transformers 5.23.0" in card  # from run.json's versions
    assert "merged into the weights" in card

    # The eval table as the Hub's model-index, which huggingface_hub's card parser reads back.
    from huggingface_hub import ModelCard

    parsed = ModelCard(card)
    assert parsed.data.model_name == "me/tiny"
    results = {
        (r.dataset_name, r.dataset_type, r.dataset_split, r.task_type, r.metric_type, r.metric_value)
        for r in parsed.data.eval_results
    }
    assert results == {
        ("pubmedqa", "qiaojin/PubMedQA", "test", "multiple-choice", "accuracy", 0.538),
        ("medmcqa", "openlifescienceai/medmcqa", "train", "multiple-choice", "accuracy", 0.29),
    }

    adapter_card = model_card(run_dir, merged=False)
    assert front_matter(adapter_card)["library_name"] == "peft"
    assert "AutoPeftModelForCausalLM" in adapter_card


def test_card_for_a_medical_recipe_on_the_embedded_base(tmp_path):
    """Written by hand: the card reads only recipe.yaml, run.json and eval.json."""
    from run_dirs import recipe_dict

    from finetune.recipe import to_yaml, validate

    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_config.json").write_text("{}")
    data = recipe_dict("embedded", name="medical-pubmedqa", quantization="nf4")
    data["data"]["sources"] = [
        {"path": "/somewhere/pubmedqa/ori_pqal.json", "reader": "pubmedqa"},
        {"hub": "org/chats", "reader": "messages"},
    ]
    (run / "recipe.yaml").write_text(to_yaml(validate(data, "test")))
    (run / "run.json").write_text("{}")
    card = model_card(run, merged=False)
    meta = front_matter(card)
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert meta["license"] == "apache-2.0"
    assert meta["datasets"] == ["org/chats"]
    assert {"qlora", "medical", "peft"} <= set(meta["tags"])
    assert "| `ori_pqal.json` | train | pubmedqa | MIT | yes |" in card  # license from the reader registry
    assert "/somewhere" not in card.split("## Recipe")[0]
    assert "not medical advice" in card
    assert "No evaluation was run" in card
    assert "- transformers " in card  # installed versions when run.json has none


class StandInHub:
    """Just enough of the Hub's HTTP API for create_repo + upload_folder: repos, preupload, commit, revision info."""

    def __init__(self):
        self.repos: dict[str, dict] = {}
        self.requests: list[tuple[str, str]] = []
        self.auth: set[str] = set()
        self.fail_with: int | None = None
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, status: int, body: dict):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                hub.requests.append(("GET", self.path))
                if hub.fail_with:
                    return self._reply(hub.fail_with, {"error": "Invalid credentials in Authorization header"})
                repo_id = self.path.split("/api/models/", 1)[1].split("/revision/")[0]
                if repo_id not in hub.repos:
                    return self._reply(404, {"error": "Repository not found"})
                repo = hub.repos[repo_id]
                self._reply(
                    200,
                    {
                        "id": repo_id,
                        "sha": repo["sha"],
                        "private": repo["private"],
                        "siblings": [{"rfilename": n} for n in repo["files"]],
                    },
                )

            def do_POST(self):
                hub.requests.append(("POST", self.path))
                hub.auth.add(self.headers.get("Authorization", ""))
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if hub.fail_with:
                    return self._reply(hub.fail_with, {"error": "Invalid credentials in Authorization header"})
                if self.path == "/api/repos/create":
                    payload = json.loads(body)
                    repo_id = f"{payload['organization']}/{payload['name']}"
                    if repo_id in hub.repos:
                        return self._reply(
                            409, {"error": "You already created this model repo", "url": f"{hub.url}/{repo_id}"}
                        )
                    hub.repos[repo_id] = {
                        "visibility": payload.get("visibility"),
                        "private": payload.get("visibility") == "private",
                        "files": {},
                        "commits": [],
                        "sha": "0" * 40,
                    }
                    return self._reply(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id})
                if self.path == "/api/validate-yaml":
                    return self._reply(200, {"errors": [], "warnings": []})
                repo_id, action = self.path.removeprefix("/api/models/").rsplit("/", 2)[0], self.path.rsplit("/", 2)[1]
                repo = hub.repos[repo_id]
                if action == "preupload":
                    files = json.loads(body)["files"]
                    return self._reply(
                        200,
                        {
                            "files": [
                                {
                                    "path": f["path"],
                                    "uploadMode": "regular",
                                    "shouldIgnore": False,
                                    "oid": git_sha1(repo["files"][f["path"]]) if f["path"] in repo["files"] else None,
                                }
                                for f in files
                            ]
                        },
                    )
                if action == "commit":
                    lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
                    header = next(line["value"] for line in lines if line["key"] == "header")
                    changed = {}
                    for line in lines:
                        if line["key"] == "file":
                            changed[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
                    repo["files"].update(changed)
                    repo["sha"] = hashlib.sha1(repr(sorted(repo["files"].items())).encode()).hexdigest()
                    repo["commits"].append({"message": header["summary"], "files": sorted(changed)})
                    return self._reply(
                        200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{repo['sha']}", "commitOid": repo["sha"]}
                    )
                self._reply(404, {"error": "not found"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@pytest.fixture
def online(monkeypatch):
    """conftest sets HF_HUB_OFFLINE for the whole session; the stand-in is local, so allow requests to it."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    # huggingface_hub fetches a registry of coding agents from huggingface.co to build its user agent; keep the test
    # hermetic.
    monkeypatch.setattr("huggingface_hub.utils._detect_agent._fetch_registry", lambda: None, raising=False)
    monkeypatch.setenv("HF_TOKEN", TOKEN)


def assert_token_nowhere(folder: Path, caplog, capsys):
    out = capsys.readouterr()
    assert TOKEN not in out.out + out.err
    assert TOKEN not in caplog.text
    for file in folder.rglob("*"):
        if file.is_file():
            assert TOKEN.encode() not in file.read_bytes(), file


def test_push_merged_then_again_is_a_no_op(run_dir, online, caplog, capsys):
    from huggingface_hub import HfApi

    caplog.set_level(logging.DEBUG)
    with StandInHub() as stand_in:
        api = HfApi(endpoint=stand_in.url)
        first = hub.push(run_dir, "me/tiny-merged", what="merged", private=True, api=api)
        second = hub.push(run_dir, "me/tiny-merged", what="merged", private=True, api=api)
    repo = stand_in.repos["me/tiny-merged"]
    expected = [
        "README.md",
        "chat_template.jinja",
        "config.json",
        "generation_config.json",
        "merge.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert first["files"] == expected
    assert sorted(repo["files"]) == expected
    assert repo["visibility"] == "private"
    assert [c["message"] for c in repo["commits"]] == [
        "Upload merged model (finetune)"
    ]  # the second push committed nothing
    assert second["url"] == first["url"]
    assert stand_in.auth == {f"Bearer {TOKEN}"}  # the token from HF_TOKEN reached the Hub, and only in the header
    assert front_matter(repo["files"]["README.md"].decode())["library_name"] == "transformers"
    assert repo["files"]["model.safetensors"] == (run_dir / "merged" / "model.safetensors").read_bytes()
    assert_token_nowhere(run_dir, caplog, capsys)
    assert not list(run_dir.glob(".push-*"))


def test_push_adapter_rewrites_the_base_path(run_dir, online, tiny_llama_dir):
    from huggingface_hub import HfApi

    before = (run_dir / "adapter" / "adapter_config.json").read_text()
    with StandInHub() as stand_in:
        result = hub.push(run_dir, "me/tiny-adapter", what="adapter", private=False, api=HfApi(endpoint=stand_in.url))
    repo = stand_in.repos["me/tiny-adapter"]
    assert repo["visibility"] == "public"
    assert result["files"] == sorted(repo["files"]) and "adapter_model.safetensors" in repo["files"]
    assert [c["message"] for c in repo["commits"]] == ["Upload adapter (finetune)"]
    assert json.loads(repo["files"]["adapter_config.json"])["base_model_name_or_path"] == str(tiny_llama_dir)
    assert (run_dir / "adapter" / "adapter_config.json").read_text() == before  # the run's own file is untouched


def test_push_auth_failure_is_one_line_without_the_token(run_dir, online, caplog, capsys):
    from huggingface_hub import HfApi

    with StandInHub() as stand_in:
        stand_in.fail_with = 401
        with pytest.raises(FinetuneError) as error:
            hub.push(run_dir, "me/tiny-merged", api=HfApi(endpoint=stand_in.url))
    message = str(error.value)
    assert "401" in message and "HF_TOKEN" in message and "\n" not in message and TOKEN not in message
    assert_token_nowhere(run_dir, caplog, capsys)


def test_push_network_failure(run_dir, online):
    from huggingface_hub import HfApi

    with pytest.raises(FinetuneError, match="cannot reach the Hugging Face Hub"):
        hub.push(run_dir, "me/tiny-merged", api=HfApi(endpoint="http://127.0.0.1:9"))


def test_push_dry_run_and_refusals(run_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    plan = hub.push(run_dir, "me/tiny", what="adapter", dry_run=True)
    assert "adapter_model.safetensors" in plan["files"] and "README.md" in plan["files"]
    assert plan["card"].startswith("---\n") and plan["url"] is None
    with pytest.raises(FinetuneError, match="not a Hub repo id"):
        hub.push(run_dir, "no-namespace", dry_run=True)
    incomplete = make_run(tmp_path / "incomplete", run_dir / "merged")
    (incomplete / "run.json").unlink()
    with pytest.raises(FinetuneError, match="incomplete"):
        hub.push(incomplete, "me/tiny", dry_run=True)
    (incomplete / "run.json").write_text("{}")
    with pytest.raises(FinetuneError, match="no merged model yet"):
        hub.push(incomplete, "me/tiny", what="merged", dry_run=True)
