"""HF ``config.json`` sections -> fields of our typed configs."""
