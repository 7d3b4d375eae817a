"""``logger=console``: in a log file (no terminal) a line every ~10% of the run with the chosen
figures under short names; evaluations as lines; nothing when ``trainer.progress=false``."""

from __future__ import annotations

from types import SimpleNamespace

from rlfuse.manager import instantiate, resolve


def ctx(max_steps=20, progress=True):
    trainer = SimpleNamespace(max_steps=max_steps, progress=progress)
    return SimpleNamespace(cfg=SimpleNamespace(trainer=trainer, algo=SimpleNamespace(name="ppo")))


def console(**options):
    p = instantiate(resolve("console"), options, name="console", where="logger.console")
    return p


def test_a_line_every_tenth_of_the_run(capsys):
    p = console()
    p.setup(ctx=ctx(max_steps=20))
    for step in range(1, 21):
        p.log(step=step, metrics={"reward/mean": step / 10, "loss/total": 1.0, "optim/lr": 1e-3})
    p.teardown()
    err = capsys.readouterr().err.splitlines()
    assert [line.split("]")[0] for line in err] == [f"[ppo {s}/20" for s in range(2, 21, 2)]
    assert err[0] == "[ppo 2/20] reward=0.2  loss=1"  # short names; optim/lr is not a default key


def test_chosen_keys_and_eval_lines(capsys):
    p = console(keys=["optim/lr"])
    p.setup(ctx=ctx(max_steps=3))
    p.log(step=3, metrics={"reward/mean": 1.0, "optim/lr": 0.001})
    p.log(step=3, metrics={"step": 3, "eval/reward": 0.5, "eval/exact": 0.25})
    out = capsys.readouterr()
    assert out.err.strip() == "[ppo 3/3] optim/lr=0.001"
    assert out.out.strip() == "[eval @ step 3] eval/reward=0.5000  eval/exact=0.2500"


def test_progress_off_prints_no_step_lines(capsys):
    p = console()
    p.setup(ctx=ctx(max_steps=4, progress=False))
    for step in range(1, 5):
        p.log(step=step, metrics={"reward/mean": 0.0})
    assert capsys.readouterr().err == ""
