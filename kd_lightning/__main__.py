from kd_lightning.cli import entry

entry()
