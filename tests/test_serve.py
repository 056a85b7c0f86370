"""`finetune serve` as clients use it: the official `openai` client against 127.0.0.1, a real uvicorn process."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from cli_runs import env
from run_dirs import make_run

openai = pytest.importorskip("openai")

QUESTIONS = [f"Question {i}: name a colour." for i in range(8)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(target, *args: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "finetune.cli", "serve", str(target), "--port", str(port), *args],
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 300
    while time.time() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the server exited: {process.stderr.read()[-2000:]}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2)
            return process, port
        except urllib.error.HTTPError:
            return process, port  # it answers (401 with an API key): it is up
        except OSError:
            time.sleep(0.5)
    process.kill()
    raise AssertionError("the server did not start in 300 s")


def client(port: int, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0, timeout=300)


def ask(api: openai.OpenAI, question: str, **kwargs) -> str:
    response = api.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": question}], temperature=0, max_tokens=8, **kwargs
    )
    return response.choices[0].message.content


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_llama_dir):
    return make_run(tmp_path_factory.mktemp("serve") / "run", tiny_llama_dir)


@pytest.fixture(scope="module")
def server(run):
    process, port = start(run)
    yield process, port
    if process.poll() is None:
        process.kill()


def test_answers_equal_finetune_generate_alone_and_eight_at_once(run, server):
    _, port = server
    api = client(port)
    assert [m.id for m in api.models.list().data] == ["tiny"]
    generated = subprocess.run(
        [sys.executable, "-m", "finetune.cli", "generate", str(run), QUESTIONS[0], "--max-new-tokens", "8"],
        env=env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert generated.returncode == 0, generated.stderr[-2000:]
    assert ask(api, QUESTIONS[0]) == generated.stdout.strip()
    alone = [ask(api, q) for q in QUESTIONS]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda q: ask(api, q), QUESTIONS))
    assert together == alone
    assert len(set(alone)) > 1, "the questions get different answers, so a mix-up would show"


def test_streaming_and_completions(server):
    _, port = server
    api = client(port)
    pieces = [
        chunk.choices[0].delta.content or ""
        for chunk in api.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": QUESTIONS[1]}],
            temperature=0,
            max_tokens=8,
            stream=True,
        )
    ]
    assert len(pieces) > 1 and "".join(pieces).strip() == ask(api, QUESTIONS[1])
    completion = api.completions.create(model="tiny", prompt="The sky is", temperature=0, max_tokens=5)
    assert completion.object == "text_completion" and completion.usage.completion_tokens <= 5


def test_openai_shaped_errors(server):
    _, port = server
    api = client(port)
    with pytest.raises(openai.NotFoundError) as missing:
        api.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert missing.value.body["code"] == "model_not_found" and missing.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as bad:
        api.chat.completions.create(model="tiny", messages=[{"role": "wizard", "content": "hi"}])
    assert bad.value.status_code == 400 and bad.value.body["type"] == "invalid_request_error"
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions", data=b"{not json", headers={"Content-Type": "application/json"}
    )
    with pytest.raises(urllib.error.HTTPError) as raw:
        urllib.request.urlopen(request, timeout=30)
    assert raw.value.code == 400 and set(json.loads(raw.value.read())["error"]) == {"message", "type", "param", "code"}


def test_an_api_key_is_required_when_set_and_sigterm_stops_cleanly(run):
    process, port = start(run, "--api-key", "s3cret")
    try:
        with pytest.raises(openai.AuthenticationError):
            ask(client(port, "wrong"), QUESTIONS[2])
        assert ask(client(port, "s3cret"), QUESTIONS[2])
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr[-2000:]
    assert "s3cret" not in stderr


def test_a_gguf_is_served_by_llama_cpp(run, tmp_path):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make setup-llamacpp)")
    from finetune import gguf, merge

    merge.merge(run)
    path = gguf.export(run, "f16")
    process, port = start(path)
    try:
        api = client(port)
        assert [m.id for m in api.models.list().data] == ["tiny-f16"]
        response = api.chat.completions.create(
            model="tiny-f16", messages=[{"role": "user", "content": QUESTIONS[3]}], temperature=0, max_tokens=8
        )
        assert response.choices[0].message.content is not None and response.usage.completion_tokens <= 8
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=60)
    assert process.returncode == 0
