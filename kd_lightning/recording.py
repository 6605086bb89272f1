"""Moved to :mod:`kd_lightning.teacher` (format, recorder, recorded); these names stay importable from here, and
teachers pickled under this module's name keep unpickling."""

from kd_lightning.teacher.format import (FORMAT_VERSION, META_FILE, RecordingSettings, data_identity, describe_mismatch,  # noqa: F401
                                         draw_from_tail, index_dtype, rebuild_logits, sampled_tail, student_shaped_tail)
from kd_lightning.teacher.recorded import RecordedTeacher  # noqa: F401
from kd_lightning.teacher.recorder import record_teacher  # noqa: F401
