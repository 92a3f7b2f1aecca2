"""bbfl: black-box and zeroth-order federated prompt tuning."""

__version__ = "0.1.0"
