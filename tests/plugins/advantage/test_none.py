"""``advantage=none``: no estimator -- the offline presets select it, no advantage plugin is
registered and the trainer leaves ``batch.advantages`` unset."""

from __future__ import annotations

from rlfuse.manager import PluginManager
from support import compose, load_plugins


def test_none_selects_no_plugin():
    cfg = compose(["algo=ppo", "advantage=none"])
    assert not cfg.advantage or "plugin" not in cfg.advantage
    pm = PluginManager()
    load_plugins(cfg, pm)
    assert pm.hook.advantage.get_hookimpls() == []
    assert pm.hook.advantage(ctx=None, batch=None) is None  # first-result hook: nobody answers


def test_offline_presets_use_none():
    for preset in ("sft", "dpo", "reward_model"):
        cfg = compose([f"algo={preset}"])
        assert not cfg.advantage or "plugin" not in cfg.advantage, preset
