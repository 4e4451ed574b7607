"""The client package imports and works in a process where torch and OpenCV cannot be imported."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_client_works_without_torch_or_opencv(default_server, cat_path):
    server, _ = default_server
    script = textwrap.dedent(f"""
        import sys
        for name in ("torch", "torchvision", "timm", "cv2"):
            sys.modules[name] = None  # any import of these now raises ImportError
        import numpy as np
        import camserve
        from camserve import Client, CamserveError
        from camserve.cli import main
        with Client("127.0.0.1:{server.port}", timeout=60) as client:
            assert client.model_info().name == "efficientnet_lite0"
            assert client.predict({str(cat_path)!r}).best.label
            e = client.explain({str(cat_path)!r})
            assert e.raw.shape == (7, 7) and e.heatmap.shape == (300, 451)
            assert e.overlay().shape == (300, 451, 3)
        assert main(["--target", "127.0.0.1:{server.port}", "info"]) == 0
        loaded = [m for m in ("torch", "cv2", "camserve_server") if sys.modules.get(m)]
        assert not loaded, loaded
        print("client ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "client ok" in done.stdout


def test_stream_without_opencv_says_how_to_install_it(tmp_path):
    """`camserve stream` where OpenCV cannot be imported: one line saying what to install, no
    traceback, exit 1; nothing is sent (no server listens at the target)."""
    script = textwrap.dedent(f"""
        import sys
        sys.modules["cv2"] = None  # any import of cv2 now raises ImportError
        from camserve.cli import main
        sys.exit(main(["--target", "127.0.0.1:1", "stream", {str(tmp_path / "in.mp4")!r}]))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines() == [
        "camserve: reading and writing video needs OpenCV: pip install 'camserve[video]' (or "
        "opencv-python-headless)"], done.stderr


def test_the_client_modules_import_one_way():
    """No import cycle among the client's modules, lazy (in-function) imports included."""
    import ast
    from pathlib import Path

    import camserve

    root = Path(camserve.__file__).parent
    graph = {}
    for path in root.glob("*.py"):
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module:
                    imported.add(node.module.split(".")[0])
                else:
                    imported |= {alias.name for alias in node.names}
        graph[path.stem] = imported & {p.stem for p in root.glob("*.py")} - {path.stem}

    def visit(name, path):
        assert name not in path, " -> ".join([*path, name])
        for other in graph.get(name, ()):
            visit(other, [*path, name])

    for name in graph:
        if name != "__init__":
            visit(name, [])
