"""The OpenAI-compatible server with aquakv, as the README starts it: a streamed completion over localhost."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

if os.environ.get("AQUAKV_REQUIRE_VLLM") != "1":
    pytest.importorskip("vllm")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_streams_a_completion(tmp_path):
    from aquakv.models import hf_directory

    model, port = str(hf_directory()), _free_port()
    log = open(tmp_path / "server.log", "w")
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", "127.0.0.1",
           "--port", str(port), "--enforce-eager", "--max-model-len", "2048",
           "--additional-config", json.dumps({"aquakv": {"method": "higgs", "bits": 2}})]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.time() + 600
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-4000:]
            try:
                urllib.request.urlopen(base + "/models", timeout=2)
                break
            except OSError:
                assert time.time() < deadline, "server not ready in 600 s"
                time.sleep(3)
        body = json.dumps({"model": model, "prompt": "The capital of France is", "max_tokens": 12, "temperature": 0,
                           "stream": True}).encode()
        request = urllib.request.Request(base + "/completions", data=body, headers={"Content-Type": "application/json"})
        chunks = []
        with urllib.request.urlopen(request, timeout=300) as response:
            for line in response:
                line = line.decode().strip()
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunks.append(json.loads(line[6:])["choices"][0]["text"])
                elif line == "data: [DONE]":
                    break
        assert len(chunks) >= 2, chunks  # streamed, piece by piece
        assert "".join(chunks).strip(), chunks
        assert "aquakv: AquaKVCodec(HIGGS" in (tmp_path / "server.log").read_text()
    finally:
        os.killpg(server.pid, signal.SIGINT)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(30)
        log.close()
