"""Resume states load inside the WebUI too, where ``torch.load`` is replaced by ``modules/safe.py`` ``load`` (whose
allow-list rejects current torch's ``.format_version`` entries and then returns None instead of raising)."""

import torch

from lib_lora import state


def test_load_state_ignores_a_replaced_torch_load(tmp_path, monkeypatch):
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    net(torch.randn(4, 3)).sum().backward()
    opt.step()
    folder = state.save_state(tmp_path / "s-state", network_sd={"w": net.weight.detach()},
                              optimizer=opt.state_dict(), scheduler={"last_epoch": 1},
                              extra={"scaler": {}}, train_state={"global_step": 1, "epoch": 0, "step_in_epoch": 1})

    def webui_safe_load(*args, **kwargs):  # what modules/safe.py load returns after a failed check
        return None

    monkeypatch.setattr(torch, "load", webui_safe_load)
    loaded = state.load_state(folder)
    assert loaded["scheduler"] == {"last_epoch": 1}
    assert loaded["optimizer"]["state"][0]["step"] == opt.state_dict()["state"][0]["step"]
    assert loaded["train_state"]["global_step"] == 1
