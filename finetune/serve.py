"""finetune serve: an OpenAI-compatible HTTP server (FastAPI + uvicorn) for a finished run, on 127.0.0.1 by default.

    GET  /v1/models               the one model served, named after the run's recipe (or --model-name)
    POST /v1/chat/completions     messages in the training chat template; `stream: true` for server-sent events
    POST /v1/completions          a raw prompt, continued

Backends: transformers (base + adapter, or the merged model) on the CPU or one GPU, with requests answered one at a
time; llama.cpp for an exported GGUF (the engine Ollama runs); vLLM with the LoRA adapter, when vLLM is installed on
a GPU machine (its own OpenAI server is started). Errors have OpenAI's shape: {"error": {message, type, param, code}},
400 for a malformed request, 401 for a missing or wrong API key, 404 for an unknown model.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from finetune import runs
from finetune.errors import FinetuneError

log = logging.getLogger(__name__)


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class Sampling(BaseModel):
    """Request fields both endpoints share; unknown OpenAI fields are accepted and ignored, as most servers do."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, gt=0)
    max_completion_tokens: int | None = Field(None, gt=0)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: Literal[1] = 1
    stop: str | list[str] | None = None
    stream: bool = False

    @property
    def limit(self) -> int:
        return self.max_completion_tokens or self.max_tokens or 256

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class ChatRequest(Sampling):
    messages: list[Message] = Field(..., min_length=1)


class CompletionRequest(Sampling):
    prompt: str | list[str]


def _cut(text: str, stops: list[str]) -> tuple[str, bool]:
    """The text up to the first stop sequence, and whether one was found."""
    ends = [text.find(s) for s in stops if s and s in text]
    return (text[: min(ends)], True) if ends else (text, False)


class TransformersBackend:
    """Base + adapter (or a merged folder) in transformers; one generation at a time, so answers equal
    `finetune generate`'s and memory stays that of one request."""

    def __init__(self, target: Path, merged: bool):
        from finetune import inference
        from finetune import model as model_lib

        if merged:
            recipe = runs.finished_recipe(target)
            self.model, self.tokenizer = inference.load_merged(
                runs.RunFolder(target).merged, model_lib.compute_dtype(recipe.model)
            )
        else:
            self.model, self.tokenizer = inference.load_run(target)
        self.lock = threading.Lock()
        self.name = "transformers (merged model)" if merged else "transformers (base + adapter)"

    def _ids(self, request):
        from finetune import inference

        if isinstance(request, ChatRequest):
            return inference.chat_prompt(self.tokenizer, [m.model_dump() for m in request.messages], self.model.device)
        import torch

        prompt = request.prompt if isinstance(request.prompt, str) else "".join(request.prompt)
        return torch.tensor([self.tokenizer(prompt, add_special_tokens=False)["input_ids"]], device=self.model.device)

    def complete(self, request) -> tuple[str, str, int, int]:
        from finetune import inference

        ids = self._ids(request)
        with self.lock:
            new = inference.continue_ids(
                self.model, self.tokenizer, ids, request.limit, request.temperature, request.top_p
            )
        text, stopped = _cut(self.tokenizer.decode(new, skip_special_tokens=True).strip(), request.stops)
        finish = "length" if len(new) >= request.limit and not stopped else "stop"
        return text, finish, ids.shape[1], len(new)

    def stream(self, request) -> Iterator[str]:
        from transformers import TextIteratorStreamer

        from finetune import inference

        ids = self._ids(request)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)

        def run():
            with self.lock:
                inference.continue_ids(
                    self.model, self.tokenizer, ids, request.limit, request.temperature, request.top_p, streamer
                )

        threading.Thread(target=run, daemon=True).start()
        yield from streamer


class LlamaCppBackend:
    """An exported GGUF in llama.cpp (llama-cpp-python), with the chat template the file carries."""

    def __init__(self, path: Path):
        from finetune import gguf_check

        if gguf_check.llama_cpp_version() is None:
            raise FinetuneError(f"serve {path}: a GGUF is served by llama.cpp; run `make setup-llamacpp` first")
        self.llm = gguf_check.load(path, n_ctx=4096, logits_all=False)
        self.lock = threading.Lock()
        self.name = f"llama.cpp ({path.name})"

    def _call(self, request, stream: bool):
        kwargs = dict(
            max_tokens=request.limit,
            temperature=request.temperature,
            top_p=request.top_p,
            stop=request.stops or None,
            stream=stream,
        )
        if isinstance(request, ChatRequest):
            return self.llm.create_chat_completion([m.model_dump() for m in request.messages], **kwargs)
        prompt = request.prompt if isinstance(request.prompt, str) else "".join(request.prompt)
        return self.llm.create_completion(prompt, **kwargs)

    def complete(self, request) -> tuple[str, str, int, int]:
        with self.lock:
            out = self._call(request, stream=False)
        choice = out["choices"][0]
        text = choice["message"]["content"] if "message" in choice else choice["text"]
        usage = out["usage"]
        return text.strip(), choice["finish_reason"], usage["prompt_tokens"], usage["completion_tokens"]

    def stream(self, request) -> Iterator[str]:
        with self.lock:
            for chunk in self._call(request, stream=True):
                choice = chunk["choices"][0]
                piece = choice.get("delta", {}).get("content") if "delta" in choice else choice.get("text")
                if piece:
                    yield piece


def _error(status: int, message: str, param: str | None = None, code: str | None = None, kind: str | None = None):
    from fastapi.responses import JSONResponse

    kind = kind or ("invalid_request_error" if status < 500 else "server_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status)


def app(backend, model_name: str, api_key: str | None = None):
    """The FastAPI application serving one backend under one model name."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import StreamingResponse

    api = FastAPI(title="finetune serve", version="1")
    created = int(time.time())

    @api.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return _error(400, f"{where or 'body'}: {first.get('msg')}", param=where or None)

    @api.middleware("http")
    async def authorize(request: Request, call_next):
        if api_key is not None and not secrets.compare_digest(
            request.headers.get("authorization", ""), f"Bearer {api_key}"
        ):
            return _error(401, "Incorrect or missing API key; send Authorization: Bearer KEY", code="invalid_api_key")
        return await call_next(request)

    def unknown(name: str):
        return _error(
            404,
            f"The model '{name}' does not exist; this server serves '{model_name}'",
            param="model",
            code="model_not_found",
        )

    def respond(request, kind: str):
        if request.model != model_name:
            return unknown(request.model)
        ident = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{secrets.token_hex(12)}"
        if request.stream:
            return StreamingResponse(_events(backend, request, kind, ident, model_name), media_type="text/event-stream")
        text, finish, prompt_tokens, completion_tokens = backend.complete(request)
        choice = (
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
            if kind == "chat"
            else {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        )
        return {
            "id": ident,
            "object": "chat.completion" if kind == "chat" else "text_completion",
            "created": int(time.time()),
            "model": model_name,
            "choices": [choice],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }

    @api.get("/v1/models")
    def models():
        return {
            "object": "list",
            "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "finetune"}],
        }

    @api.get("/v1/models/{name}")
    def model(name: str):
        if name != model_name:
            return unknown(name)
        return {"id": model_name, "object": "model", "created": created, "owned_by": "finetune"}

    @api.post("/v1/chat/completions")
    def chat(request: ChatRequest):
        return respond(request, "chat")

    @api.post("/v1/completions")
    def completions(request: CompletionRequest):
        return respond(request, "text")

    return api


def _events(backend, request, kind: str, ident: str, model_name: str) -> Iterator[str]:
    """Server-sent events as OpenAI streams them: one chunk per piece of text, a last one with the finish reason."""

    def chunk(piece: str | None, finish: str | None) -> str:
        if kind == "chat":
            delta = {"role": "assistant", "content": piece} if piece is not None else {}
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": piece or "", "logprobs": None, "finish_reason": finish}
        body = {
            "id": ident,
            "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
            "created": int(time.time()),
            "model": model_name,
            "choices": [choice],
        }
        return f"data: {json.dumps(body)}\n\n"

    text = ""
    for piece in backend.stream(request):
        cut, stopped = _cut(text + piece, request.stops)
        if cut[len(text) :]:
            yield chunk(cut[len(text) :], None)
        text = cut
        if stopped:
            break
    yield chunk(None, "stop")
    yield "data: [DONE]\n\n"


def _vllm(target: Path, host: str, port: int, api_key: str | None, model_name: str) -> int:
    """vLLM's own OpenAI server with the run's LoRA adapter on its base (GPU machines with vLLM installed)."""
    import importlib.util
    import os

    import torch

    if importlib.util.find_spec("vllm") is None or not torch.cuda.is_available():
        raise FinetuneError(
            "serve --vllm: needs vLLM installed on a machine with a GPU (pip install vllm); "
            "without one, serve with transformers (the default) or --gguf"
        )
    recipe = runs.finished_recipe(target)
    from finetune.card import base_model_id

    base = base_model_id(recipe) or recipe.model.base
    command = [
        shutil.which("vllm") or "vllm",
        "serve",
        base,
        "--enable-lora",
        "--lora-modules",
        f"{model_name}={runs.RunFolder(target).adapter}",
        "--max-lora-rank",
        str(max(16, recipe.adapter.r)),
        "--host",
        host,
        "--port",
        str(port),
    ]
    if api_key:
        command += ["--api-key", api_key]
    log.info("starting vLLM: %s", " ".join(c if c != api_key else "***" for c in command))
    os.execvp(command[0], command)
    return 0


def serve(
    target: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    model_name: str | None = None,
    merged: bool = False,
    vllm: bool = False,
) -> int:
    """Serve a run folder (base + adapter, or --merged), or a .gguf file, until SIGINT or SIGTERM."""
    import uvicorn

    path = Path(target)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FinetuneError(f"serve {target}: no such GGUF file; export one with `finetune export RUN_DIR`")
        name = model_name or path.stem
        backend = LlamaCppBackend(path)
    else:
        recipe = runs.finished_recipe(path)
        name = model_name or recipe.name
        if vllm:
            return _vllm(path, host, port, api_key, name)
        if merged and not (runs.RunFolder(path).merged / "merge.json").is_file():
            raise FinetuneError(f"serve {target} --merged: no merged model yet; run `finetune merge {target}`")
        backend = TransformersBackend(path, merged)
    if host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        log.warning("serving on %s without --api-key: anyone who reaches this address can use the model", host)
    log.info("serving %s as '%s' with %s on http://%s:%d/v1", target, name, backend.name, host, port)
    server = uvicorn.Server(uvicorn.Config(app(backend, name, api_key), host=host, port=port, log_level="warning"))

    # SIGTERM (a service manager, `kill`) and Ctrl-C finish the requests in flight, then exit 0; uvicorn's own
    # handlers would re-raise the signal after shutting down, which reads as a crash to whoever stopped it.
    def stop(signum, frame):
        server.should_exit = True

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stop)
    asyncio.run(server.serve())
    log.info("server stopped")
    return 0
