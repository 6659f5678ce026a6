import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MESHTRON_TIMEOUT", "120")
os.environ.setdefault("MESHTRON_DEVICE", "cpu")   # the suite runs on the CPU; `gpu` tests ask for cuda themselves
