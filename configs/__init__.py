"""The presets: `--config=configs/pretrain.py[:args]` (installed as `mmelectra_configs`)."""
