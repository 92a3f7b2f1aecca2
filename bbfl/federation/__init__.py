"""Federation building blocks: data partitioners and the pickle-free wire format.

The engines (in-process simulation, Flower) and FedBPT build on these (next issue).
"""

from bbfl.federation.partition import label_histogram, partition_labels
from bbfl.federation.wire import InvalidUpdate, decode_message, encode_message, validate_update

__all__ = [
    "InvalidUpdate",
    "decode_message",
    "encode_message",
    "label_histogram",
    "partition_labels",
    "validate_update",
]
