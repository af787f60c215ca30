"""The router-training command line on the reference DiT: writes a router the loader reads, and a
run stopped by Ctrl-C resumes to the same router as an uninterrupted one."""
import torch

from benchmarks import train_router
from procache_core.router import Router
from procache_core.router_training import ReferenceProblem

ARGS = ["--steps", "4", "--trajectories", "3", "--batch", "1", "--lambda-period", "2", "--beta", "1e-3"]


def test_writes_a_router_for_the_step_count(tmp_path, capsys):
    out = str(tmp_path / "r.safetensors")
    assert train_router.main(ARGS + ["--out", out]) == 0
    router = Router.load(out)
    assert router.logits.shape[0] == 4 and router.tau == 0.1
    assert router.metadata["sampler"] == "ddim" and router.metadata["steps"] == "4"
    assert "wrote" in capsys.readouterr().out


def test_interrupted_run_resumes_to_the_uninterrupted_router(tmp_path, monkeypatch):
    whole = str(tmp_path / "whole.safetensors")
    assert train_router.main(ARGS + ["--out", whole]) == 0
    out = str(tmp_path / "r.safetensors")
    assert train_router.main(ARGS + ["--out", out, "--resume"]) == 2       # nothing to resume yet
    calls, predict = {"n": 0}, ReferenceProblem.predict

    def interrupted(self, x, step):
        calls["n"] += 1
        if calls["n"] == 40:            # inside the second trajectory
            raise KeyboardInterrupt
        return predict(self, x, step)
    monkeypatch.setattr(ReferenceProblem, "predict", interrupted)
    assert train_router.main(ARGS + ["--out", out]) == 130
    monkeypatch.setattr(ReferenceProblem, "predict", predict)
    assert (tmp_path / "r.safetensors.partial").is_file()
    assert train_router.main(ARGS + ["--out", out, "--beta", "2e-3", "--resume"]) == 2    # other settings
    assert train_router.main(ARGS + ["--out", out, "--resume"]) == 0
    assert not (tmp_path / "r.safetensors.partial").exists()
    assert torch.allclose(Router.load(out).logits, Router.load(whole).logits, atol=1e-6)
