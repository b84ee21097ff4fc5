"""`visiondet demo` as a service manager runs it: a real process, a free port it must report, and a real
SIGTERM (what `docker stop` and `systemctl stop` send) or SIGINT that must leave no temporary files behind."""

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from apps.demo.page import WEIGHTS_DIR


def _start_demo(temp_root: Path) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ, GRADIO_TEMP_DIR=str(temp_root), GRADIO_ANALYTICS_ENABLED="False",
               HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "apps.cli", "demo", "--port", "0", "--no-default-weights",
           "--weights", str(WEIGHTS_DIR / "classifier_shapes.pt")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.monotonic() + 120
    assert proc.stdout is not None
    for line in proc.stdout:
        found = re.search(r"(http://127\.0\.0\.1:(\d+)/?)", line)
        if found:
            return proc, found.group(1)
        if time.monotonic() > deadline:
            break
    proc.kill()
    pytest.fail(f"the demo printed no URL with its port; exit code {proc.wait()}")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_demo_reports_its_port_and_cleans_up_on_signal(tmp_path, sig):
    temp_root = tmp_path / "my-gradio-temp"  # the user's own GRADIO_TEMP_DIR
    proc, url = _start_demo(temp_root)
    try:
        port = int(url.rstrip("/").rsplit(":", 1)[1])
        assert port != 0
        with urllib.request.urlopen(url, timeout=30) as response:  # the printed port really serves the page
            assert response.status == 200
        ours = list(temp_root.glob("visiondet-demo-*"))
        assert len(ours) == 1 and ours[0].is_dir()  # the user's folder is honoured, not overridden
        (ours[0] / "upload.png").write_bytes(b"stands for an uploaded photo")
        proc.send_signal(sig)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert list(temp_root.iterdir()) == []  # our folder and every upload in it are gone
