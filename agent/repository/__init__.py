"""The static model repository: a TUF repository of ``.emp`` packages.

The publisher builds it (``edgeward repo``, :mod:`agent.repository.publisher`); the device
reads it (:mod:`agent.repository.client`, a :class:`~agent.updater` source). What the two
sides agree on beyond TUF itself, the custom fields of each target, lives in
:mod:`agent.repository.fields` and nowhere else.
"""

from agent.repository.fields import FIELDS_KEY, KINDS, TargetFields, target_path

__all__ = ["FIELDS_KEY", "KINDS", "TargetFields", "target_path"]
