"""A real ComfyUI server on a free loopback port, with this pack linked into its custom_nodes."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid

from .runtime import PACK_DIR, PACK_NAME, comfyui_dir


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _shadow_tree(dest: str) -> str:
    """A view of the ComfyUI tree without its extra_model_paths.yaml (it points at a folder that
    does not exist here). main.py is copied because it finds that file next to its real path."""
    src = comfyui_dir()
    os.makedirs(dest, exist_ok=True)
    for entry in os.listdir(src):
        if entry in ("extra_model_paths.yaml", "main.py", "__pycache__"):
            continue
        os.symlink(os.path.join(src, entry), os.path.join(dest, entry))
    shutil.copy2(os.path.join(src, "main.py"), os.path.join(dest, "main.py"))
    return os.path.join(dest, "main.py")


class ComfyServer:
    def __init__(self, workdir: str | None = None):
        self.workdir = workdir or tempfile.mkdtemp(prefix="usv-server-")
        self.base = os.path.join(self.workdir, "base")
        self.port = None
        self.proc = None
        self.log_path = os.path.join(self.workdir, "server.log")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def models_dir(self, kind: str) -> str:
        path = os.path.join(self.base, "models", kind)
        os.makedirs(path, exist_ok=True)
        return path

    def start(self, timeout: float = 180.0) -> "ComfyServer":
        import torch

        main_py = _shadow_tree(os.path.join(self.workdir, "comfyui"))
        os.makedirs(os.path.join(self.base, "custom_nodes"), exist_ok=True)
        link = os.path.join(self.base, "custom_nodes", PACK_NAME)
        if not os.path.exists(link):
            os.symlink(PACK_DIR, link)
        self.port = _free_port()
        args = [sys.executable, "-m", "harness.serve", main_py, "--listen", "127.0.0.1",
                "--port", str(self.port), "--base-directory", self.base, "--disable-auto-launch"]
        if not torch.cuda.is_available():
            args.append("--cpu")
        env = dict(os.environ, PYTHONPATH=PACK_DIR + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(args, cwd=PACK_DIR, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode} while starting:\n{self.log()}")
            try:
                self.get("/system_stats", timeout=2)
                return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"ComfyUI did not answer within {timeout} s:\n{self.log()}")

    def log(self) -> str:
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")[-8000:]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "_log", None):
            self._log.close()

    def get(self, path: str, timeout: float = 30):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            body = r.read()
        return json.loads(body) if body else None

    def post(self, path: str, payload: dict, timeout: float = 30):
        req = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"POST {path} -> {e.code}: {e.read().decode(errors='replace')}") from None

    def object_info(self) -> dict:
        return self.get("/object_info")

    def queue(self, prompt: dict) -> str:
        return self.post("/prompt", {"prompt": prompt, "client_id": uuid.uuid4().hex})["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 300.0) -> dict:
        """The history entry of a finished prompt; raises if it failed or took too long."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            history = self.get(f"/history/{prompt_id}")
            entry = history.get(prompt_id) if history else None
            if entry and entry.get("status", {}).get("completed") is not None:
                status = entry["status"]
                if status.get("status_str") != "success":
                    raise RuntimeError(f"prompt failed: {json.dumps(status.get('messages'))[:4000]}")
                return entry
            time.sleep(0.5)
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout} s:\n{self.log()}")

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
