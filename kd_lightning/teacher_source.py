"""Moved to :mod:`kd_lightning.teacher.source`; these names stay importable from here."""

from kd_lightning.teacher.source import prepare_teacher, train_teacher, trained_teacher_path  # noqa: F401
