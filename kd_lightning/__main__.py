from kd_lightning.run.cli import entry

entry()
