"""CI checks of what users install: the built wheel in fresh virtual environments.

Run by .ci/run with the system python3 (standard library only), in three parts:

- ``build``: the wheel from the checkout's files (tracked and untracked, never ignored build
  output), then its contents: every package folder of client/ and server/, no tests or bench.
- ``envs``: fresh virtual environments under .ci-venv/, installed in parallel (it runs in the
  background while the test suite runs): ``server`` (the wheel with [server]), ``client`` (the
  wheel alone), ``floor`` (the wheel on the lowest protobuf, grpcio, NumPy and ml_dtypes its
  floors allow, plus pytest) and ``resolve`` (pip's resolver: gradserve[server] beside
  tritonclient[grpc] and kserve, --dry-run).
- ``check``: ``gradserve serve`` from the installed server environment, run in a temporary
  folder (not the checkout), then against it: a gradient through the installed SDK, ``gradserve
  models`` from the client-only environment, the Node.js example, and the SDK's tests on the floor
  versions.

Every step prints ``ci: <step> <seconds> s``.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from typing import Iterator

ROOT = pathlib.Path(__file__).resolve().parent.parent
DIST = ROOT / "dist"
VENVS = ROOT / ".ci-venv"
# The lowest versions pyproject's floors allow (keep in step with [project] dependencies).
FLOORS = ["protobuf==6.30.0", "grpcio==1.72.1", "numpy==1.26.0", "ml_dtypes==0.4.0"]
# The SDK's tests that need no TensorFlow and no server extra.
SDK_TESTS = ["tests/unit/test_codec.py", "tests/unit/test_errors.py", "tests/unit/test_packaging.py",
             "tests/unit/test_sdk_requests.py",
             "tests/integration/test_sdk_alone.py"]
FORBIDDEN_TOP = {"tests", "bench", "tools", "examples", "protos", "client", "server", "docs"}
# Byte-compiled at install (in the background), so that the installed server starts fast.
PIP_QUIET = ["--quiet", "--disable-pip-version-check"]


@contextlib.contextmanager
def step(name: str) -> Iterator[None]:
    t0 = time.monotonic()
    yield
    print(f"ci: {name} {time.monotonic() - t0:.0f} s", flush=True)


def run(*cmd: str | os.PathLike[str], log: pathlib.Path | None = None, **kw: object) -> None:
    print("+", " ".join(str(c).strip().partition("\n")[0] + (" ..." if "\n" in str(c).strip() else "")
                        for c in cmd), flush=True)
    if log is None:
        subprocess.run([str(c) for c in cmd], check=True, **kw)  # type: ignore[call-overload]
        return
    with open(log, "a") as out:
        proc = subprocess.run([str(c) for c in cmd], stdout=out, stderr=subprocess.STDOUT, **kw)  # type: ignore[call-overload]
    if proc.returncode:
        sys.stdout.write(log.read_text()[-6000:])
        raise subprocess.CalledProcessError(proc.returncode, cmd)


def wheel() -> pathlib.Path:
    (found,) = DIST.glob("gradserve-*.whl")
    return found


def build() -> None:
    with step("wheel build"), tempfile.TemporaryDirectory() as tmp:
        files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                               cwd=ROOT, check=True, capture_output=True).stdout.decode().split("\0")
        for name in filter(None, files):
            source = ROOT / name
            if source.is_file():  # a deleted file is still listed until its deletion is staged
                (pathlib.Path(tmp) / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, pathlib.Path(tmp) / name, follow_symlinks=False)
        for old in DIST.glob("gradserve-*.whl"):
            old.unlink()
        run(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", DIST, tmp)
    with step("wheel contents"):
        names = zipfile.ZipFile(wheel()).namelist()
        expected = {f"{package}/{found.relative_to(ROOT / folder).as_posix()}"
                    for package, folder in (("gradserve", "client/gradserve"),
                                            ("gradserve/server", "server/gradserve/server"))
                    for found in (ROOT / folder).rglob("__init__.py")}
        expected |= {"gradserve/py.typed", "gradserve/v1/sensitivity_service_pb2.pyi"}
        missing = sorted(expected - set(names))
        stray = sorted(n for n in names if n.split("/")[0] in FORBIDDEN_TOP)
        assert not missing and not stray, f"wheel lacks {missing}, holds {stray}"
        print(f"ci: {len(names)} files, every package folder of client/ and server/, no tests or bench")


def venv(name: str, *requirements: str, pip_upgrade: bool = False) -> None:
    path, log = VENVS / name, VENVS / f"{name}.log"
    shutil.rmtree(path, ignore_errors=True)
    log.unlink(missing_ok=True)
    t0 = time.monotonic()
    run(sys.executable, "-m", "venv", path, log=log)
    pip = [path / "bin" / "python", "-m", "pip"]
    if pip_upgrade:
        run(*pip, "install", *PIP_QUIET, "--upgrade", "pip", log=log)
    if name == "resolve":
        report = VENVS / "resolve.json"
        run(*pip, "install", "--dry-run", "--quiet", "--report", report, *requirements, log=log)
        installs = json.loads(report.read_text())["install"]
        chosen = {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in installs}
        print("ci: resolved together:", " ".join(f"{n}=={chosen[n]}" for n in (
            "gradserve", "tensorflow", "tritonclient", "kserve", "protobuf", "grpcio") if n in chosen), flush=True)
    else:
        run(*pip, "install", *PIP_QUIET, *requirements, log=log)
    print(f"ci: venv {name} {time.monotonic() - t0:.0f} s", flush=True)


def envs() -> None:
    VENVS.mkdir(exist_ok=True)
    whl = wheel()
    jobs = {
        "server": (f"gradserve[server] @ {whl.as_uri()}",),
        "client": (str(whl),),
        "floor": (str(whl), *FLOORS, "pytest>=8", "pytest-timeout>=2.3"),
        "resolve": (f"gradserve[server] @ {whl.as_uri()}", "tritonclient[grpc]", "kserve"),
    }
    with step("venvs (parallel)"), concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        futures = [pool.submit(venv, name, *reqs, pip_upgrade=name == "resolve") for name, reqs in jobs.items()]
        for f in futures:
            f.result()


def py(name: str) -> str:
    return str(VENVS / name / "bin" / "python")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


WAIT_SERVING = """
import sys, time, grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
deadline = time.monotonic() + 300
with grpc.insecure_channel(sys.argv[1]) as ch:
    stub = health_pb2_grpc.HealthStub(ch)
    while time.monotonic() < deadline:
        try:
            if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                sys.exit(0)
        except grpc.RpcError:
            pass
        time.sleep(0.3)
sys.exit("server not SERVING after 300 s")
"""

INSTALLED_GRADIENT = """
import sys, numpy as np, gradserve, gradserve.server.compute.methods
for module in (gradserve, gradserve.server.compute.methods):
    assert "/.ci-venv/server/" in module.__file__, module.__file__
bad = [m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras")]
assert not bad, f"the SDK imported {bad[:3]}"
with gradserve.Client(sys.argv[1]) as c:
    x = np.random.default_rng(0).uniform(-1, 1, (3, 4)).astype(np.float32)
    y, g = c.gradient("dense2", x, return_outputs=True)
np.testing.assert_allclose(g, 0.5, rtol=1.2e-7)
np.testing.assert_allclose(y[:, 0], 0.5 * x.sum(axis=1) + 0.1, rtol=1e-5)
print("installed SDK: dense2 gradient", float(g[0, 0]), "from", gradserve.__file__)
"""

FLOOR_VERSIONS = """
import sys, google.protobuf, grpc, numpy, importlib.metadata as md
got = [f"protobuf=={google.protobuf.__version__}", f"grpcio=={grpc.__version__}",
       f"numpy=={numpy.__version__}", f"ml_dtypes=={md.version('ml_dtypes')}"]
assert got == sys.argv[1:], got
extras = [d.metadata["Name"] for d in md.distributions()
          if d.metadata["Name"] in ("tensorflow", "grpcio-health-checking")]
assert not extras, f"server extras installed: {extras}"
print("floor environment:", " ".join(got))
"""


def check() -> None:
    port = free_port()
    address = f"127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as workdir, open(VENVS / "server-run.log", "w") as log:
        with step("installed server start"):
            server = subprocess.Popen([str(VENVS / "server" / "bin" / "gradserve"), "serve", "--host", "127.0.0.1",
                                       "--port", str(port)], cwd=workdir, stdout=log, stderr=subprocess.STDOUT)
            try:
                run(py("server"), "-c", WAIT_SERVING, address, cwd=workdir)
            except subprocess.CalledProcessError:
                server.kill()
                sys.stdout.write((VENVS / "server-run.log").read_text()[-6000:])
                raise
        try:
            with step("installed SDK gradient"):
                run(py("server"), "-c", INSTALLED_GRADIENT, address, cwd=workdir)
            with step("client-only install: gradserve models"):
                out = subprocess.run([str(VENVS / "client" / "bin" / "gradserve"), "models", "--target", address],
                                     cwd=workdir, check=True, capture_output=True, text=True).stdout
                print(out)
                assert "dense2" in out, out
                run(py("client"), "-c", "import importlib.util as u, sys; "
                    "sys.exit(u.find_spec('tensorflow') is not None or u.find_spec('grpc_health') is not None)")
                serve = subprocess.run([str(VENVS / "client" / "bin" / "gradserve"), "serve", "--port", "0"],
                                       cwd=workdir, capture_output=True, text=True, timeout=120)
                assert serve.returncode == 2 and "pip install 'gradserve[server]'" in serve.stderr, serve.stderr
            with step("node example"):
                run("node", ROOT / "examples" / "node" / "client.js", address)
            with step("SDK tests on the floor versions"):
                run(py("floor"), "-c", FLOOR_VERSIONS, *FLOORS)
                run(py("floor"), "-m", "pytest", "-q", "-p", "no:cacheprovider", *SDK_TESTS, cwd=ROOT,
                    env={**os.environ, "GRADSERVE_TEST_TARGET": address})
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                assert server.wait(60) == 0, "the installed server did not exit 0 on SIGTERM"
            finally:
                server.kill()


if __name__ == "__main__":
    {"build": build, "envs": envs, "check": check}[sys.argv[1]]()
