"""Operator commands: ``kvtier inspect``, ``fsck``, ``gc`` and ``du`` on a tier's medium.

``commands`` parses and dispatches; ``storage``, ``network`` and ``shm`` run each command on one
kind of target through the layout modules that live next to the tiers
(``kvtier.tiers.storage.scan``/``repair``, ``kvtier.tiers.network.scan``,
``kvtier.memory.scan``); ``render`` prints results for people, ``--json`` as one object.
"""

from kvtier.ops.commands import COMMANDS, add_parsers, run

__all__ = ["COMMANDS", "add_parsers", "run"]
