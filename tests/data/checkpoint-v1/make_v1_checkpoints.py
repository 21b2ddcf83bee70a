"""Pins the v1 checkpoint formats (one `config` metadata key): run once with the code of commit
257ffbb, before the checkpoint contract; the files beside this script are its output."""
import torch

from sfd.checkpoint import save_training_checkpoint
from sfd.config import to_json, train_preset
from sfd.models.lightningdit import LightningDiT, save_lightningdit

cfg = train_preset("tiny", "model.hidden_size=16", "model.num_heads=2", "model.depth=2", "model.input_size=2",
                   "model.repa_projector_dim=16", "model.repa_target_dim=8", "model.in_channels=6", "model.semantic_chans=2",
                   "model.num_classes=3", "out_dir=runs/old")
torch.manual_seed(0)
model = LightningDiT(cfg.model)
ema = LightningDiT(cfg.model)
state = {"step": 2, "images_seen": 16, "optimizer": {}, "reader": {}, "rng": {"cpu": torch.get_rng_state()}, "world_size": 1,
         "nan_skips_total": 0, "nan_skips_consecutive": 0}
save_training_checkpoint("tests/data/checkpoint-v1/run", 2, model=model, ema=ema, state=state, config_json=to_json(cfg, indent=None))
save_lightningdit(model, "tests/data/checkpoint-v1/model.safetensors")
