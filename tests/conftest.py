import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MESHTRON_TIMEOUT", "120")
