"""One module per method: BBT, FedBPT, and the white-box prompt-tuning reference."""
