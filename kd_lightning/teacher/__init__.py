"""The teacher: "the teacher's logits for this batch", answered by a live network or a recording.

- :mod:`~kd_lightning.teacher.interface`: :class:`Teacher`, the one interface;
- :mod:`~kd_lightning.teacher.live`: :class:`LiveTeacher`, a frozen ``nn.Module`` run on ``batch["inputs"]``;
- :mod:`~kd_lightning.teacher.format`: what a recording holds (:class:`RecordingSettings`, the top-k tails);
- :mod:`~kd_lightning.teacher.recorder`: :func:`record_teacher`, one pass of the teacher written as a recording;
- :mod:`~kd_lightning.teacher.recorded`: :class:`RecordedTeacher`, logits looked up by ``batch["index"]`` (and
  ``batch["view"]`` for augmented training images);
- :mod:`~kd_lightning.run.teachers`: where a run's teacher comes from (a checkpoint, trained once and cached,
  recorded once).

:class:`~kd_lightning.DistillationModule` takes any :class:`Teacher` (or a plain ``nn.Module``, wrapped by
:func:`as_teacher`).
"""

from kd_lightning.teacher.format import RecordingSettings
from kd_lightning.teacher.interface import Teacher
from kd_lightning.teacher.live import LiveTeacher, as_teacher
from kd_lightning.teacher.recorded import RecordedTeacher
from kd_lightning.teacher.recorder import record_teacher

__all__ = ["LiveTeacher", "RecordedTeacher", "RecordingSettings", "Teacher", "as_teacher", "record_teacher"]
