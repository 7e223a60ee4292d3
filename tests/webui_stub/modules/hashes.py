"""Stand-in for modules.hashes: sha256 with an in-memory cache (the host keeps cache.json)."""

import hashlib
import os

cache: dict = {}


def calculate_sha256(filename):
    digest = hashlib.sha256()
    with open(filename, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_from_cache(filename, title, use_addnet_hash=False):
    entry = cache.get(title)
    if entry is None or entry[0] != os.path.getmtime(filename):
        return None
    return entry[1]


def sha256(filename, title, use_addnet_hash=False):
    found = sha256_from_cache(filename, title)
    if found is not None:
        return found
    value = calculate_sha256(filename)
    cache[title] = (os.path.getmtime(filename), value)
    return value
