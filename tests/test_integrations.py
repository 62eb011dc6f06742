"""sm3fn.optim.SM3 inside the trainers users reach for: HF transformers' Trainer,
accelerate and Lightning, each with a checkpoint and an exact resume.

The packages are the ``integrations`` extra (``pip install -e ".[test,integrations]"``),
not dependencies of sm3fn; each test skips, naming the package, where it is absent.
"""

import os
import warnings

import pytest
import torch

from sm3fn.optim import SM3

pytestmark = pytest.mark.slow


def _tiny_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.LayerNorm(8), torch.nn.Tanh(), torch.nn.Linear(8, 2))


def _samples(n: int = 8, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = torch.randn(n, 2, generator=g)
    return [{"x": x[i], "labels": y[i]} for i in range(n)]


def _params(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _assert_same(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def _sm3_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if "SM3" in str(w.message) or "sm3fn" in str(w.message)]


# -- transformers --------------------------------------------------------------------------


class _HFRegressor(torch.nn.Module):
    """What Trainer needs of a model: forward(**batch) returning {"loss": ...}."""

    def __init__(self, seed: int = 0):
        super().__init__()
        self.net = _tiny_model(seed)

    def forward(self, x, labels=None):
        out = self.net(x)
        return {"loss": torch.nn.functional.mse_loss(out, labels), "logits": out}


def _hf_args(transformers, out_dir, **kw):
    return transformers.TrainingArguments(
        output_dir=str(out_dir), per_device_train_batch_size=4, max_steps=6, save_strategy="steps",
        save_steps=3, logging_strategy="no", report_to=[], use_cpu=True, seed=0, data_seed=0,
        dataloader_num_workers=0, disable_tqdm=True, remove_unused_columns=False, **kw)


def test_transformers_trainer_with_sm3_resumes_exactly(tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers not installed (the integrations extra)")

    def trainer(out_dir):
        model = _HFRegressor()
        opt = SM3(model.parameters(), lr=0.05, momentum=0.9)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 4))
        return model, transformers.Trainer(model=model, args=_hf_args(transformers, out_dir),
                                           train_dataset=_samples(), optimizers=(opt, sched))

    full_model, full = trainer(tmp_path / "full")
    full.train()
    assert os.path.isdir(tmp_path / "full" / "checkpoint-3")
    resumed_model, resumed = trainer(tmp_path / "resumed")
    before = _params(resumed_model)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    assert any(not torch.equal(a, b) for a, b in zip(before, _params(resumed_model)))
    _assert_same(_params(full_model), _params(resumed_model))
    # the optimizer state came back too: the resumed run's state equals the uninterrupted one's
    for p, q in zip(full_model.parameters(), resumed_model.parameters()):
        s, t = full.optimizer.state[p], resumed.optimizer.state[q]
        assert sorted(s) == sorted(t) and int(s["step"]) == int(t["step"]) == 6
        for key in s:
            torch.testing.assert_close(s[key], t[key], rtol=0, atol=0)


def test_transformers_optimizer_cls_and_kwargs_decays_weights(tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers not installed (the integrations extra)")
    data = _samples()
    model = _HFRegressor()
    args = _hf_args(transformers, tmp_path, weight_decay=0.3, lr_scheduler_type="constant", max_grad_norm=0.0)
    args.per_device_train_batch_size = len(data)  # one batch is the whole set: its order does not matter
    args.max_steps, args.save_strategy = 3, "no"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = transformers.Trainer(model=model, args=args, train_dataset=data,
                                       optimizer_cls_and_kwargs=(SM3, {"lr": 0.05}))
        trainer.train()
    assert _sm3_warnings(caught) == []  # every group key is one SM3 uses
    groups = trainer.optimizer.param_groups
    assert [g["weight_decay"] for g in groups] == [0.3, 0.0]
    # the same three steps by hand, with Trainer's groups: decay on the Linear weights only
    ref = _HFRegressor()
    decayed = {id(p) for p in groups[0]["params"]}
    names = [n for n, p in model.named_parameters() if id(p) in decayed]
    assert names == ["net.0.weight", "net.3.weight"]
    ref_opt = SM3([{"params": [p for n, p in ref.named_parameters() if n in names], "weight_decay": 0.3},
                   {"params": [p for n, p in ref.named_parameters() if n not in names], "weight_decay": 0.0}],
                  lr=0.05)
    batch = {"x": torch.stack([d["x"] for d in data]), "labels": torch.stack([d["labels"] for d in data])}
    for _ in range(3):
        ref_opt.zero_grad()
        ref(**batch)["loss"].backward()
        ref_opt.step()
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6)  # batch order: sum order
    no_decay = SM3(_HFRegressor().parameters(), lr=0.05)
    assert no_decay.param_groups[0]["weight_decay"] == 0.0


# -- accelerate ----------------------------------------------------------------------------


def test_accelerate_save_state_load_state_resumes_exactly(tmp_path):
    accelerate = pytest.importorskip("accelerate", reason="accelerate not installed (the integrations extra)")
    data = _samples(12)
    batches = [{k: torch.stack([d[k] for d in data[i:i + 4]]) for k in ("x", "labels")} for i in range(0, 12, 4)]

    def setup():
        accelerator = accelerate.Accelerator(cpu=True)
        model = _tiny_model()
        opt = SM3(model.parameters(), lr=0.05, momentum=0.5, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
        model, opt, sched = accelerator.prepare(model, opt, sched)
        return accelerator, model, opt, sched

    def train(accelerator, model, opt, sched, steps):
        for b in steps:
            opt.zero_grad()
            accelerator.backward(torch.nn.functional.mse_loss(model(b["x"]), b["labels"]))
            opt.step()
            sched.step()

    accelerator, model, opt, sched = setup()
    train(accelerator, model, opt, sched, batches)
    accelerator.save_state(str(tmp_path / "ckpt"))
    train(accelerator, model, opt, sched, batches)
    want = _params(model)

    accelerator, model, opt, sched = setup()
    accelerator.load_state(str(tmp_path / "ckpt"))
    assert int(next(iter(opt.optimizer.state.values()))["step"]) == 3
    train(accelerator, model, opt, sched, batches)
    _assert_same(want, _params(model))


# -- Lightning -----------------------------------------------------------------------------


def test_lightning_checkpoint_resumes_exactly(tmp_path):
    pl = pytest.importorskip("lightning.pytorch", reason="lightning not installed (the integrations extra)")
    data = _samples(12)

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = _tiny_model()

        def training_step(self, batch, batch_idx):
            return torch.nn.functional.mse_loss(self.net(batch["x"]), batch["labels"])

        def configure_optimizers(self):
            opt = SM3(self.parameters(), lr=0.05, momentum=0.9)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def loader():
        return torch.utils.data.DataLoader(data, batch_size=4, shuffle=False)

    def trainer(epochs, **kw):
        return pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                          enable_model_summary=False, default_root_dir=str(tmp_path), **kw)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice on num_workers and the like
        full = Module()
        checkpoint = pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_top_k=-1, every_n_epochs=1)
        trainer(2, callbacks=[checkpoint]).fit(full, loader())
        first_epoch = sorted(os.listdir(tmp_path / "ckpt"))[0]  # epoch=0-step=3.ckpt
        assert "step=3" in first_epoch
        resumed = Module()
        trainer(2, enable_checkpointing=False).fit(resumed, loader(), ckpt_path=str(tmp_path / "ckpt" / first_epoch))
    _assert_same(_params(full), _params(resumed))
    assert not any(torch.equal(a, b) for a, b in zip(_params(full), _params(Module())))
