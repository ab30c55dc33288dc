"""Worker side: copies between engine KV tensors and primary slots."""

from kvtier.transfer.worker import OffloadingWorker, SlotLayout

__all__ = ["OffloadingWorker", "SlotLayout"]
