"""Downloads one source distribution from a package index and checks its sha256, building nothing.

    python3 docker/fetch-sdist.py llama-cpp-python 0.3.36 SHA256 DEST_DIR     # prints the file's path

`pip download --no-binary :all:` would first build the sdist's whole build-backend chain from source just to
read its metadata (minutes in a clean image); this reads the index's JSON page (PEP 691) and fetches the
file itself. The index is $PIP_INDEX_URL, else PyPI; TLS trusts $PIP_CERT or $SSL_CERT_FILE when set.
"""
import hashlib
import json
import os
import ssl
import sys
import urllib.request
from pathlib import Path
from urllib.parse import urljoin


def main(name: str, version: str, sha256: str, dest: str) -> None:
    index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/") + "/"
    cafile = os.environ.get("PIP_CERT") or os.environ.get("SSL_CERT_FILE")
    context = ssl.create_default_context(cafile=cafile)
    page_url = urljoin(index, name.lower().replace("_", "-") + "/")
    request = urllib.request.Request(page_url, headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(request, context=context, timeout=60) as response:
        files = json.load(response)["files"]
    wanted = f"{name.replace('-', '_')}-{version}.tar.gz"
    entry = next((f for f in files if f["filename"].lower() == wanted.lower()), None)
    if entry is None:
        sys.exit(f"fetch-sdist: {wanted} is not on {page_url}")
    if entry.get("hashes", {}).get("sha256", sha256) != sha256:
        sys.exit(f"fetch-sdist: the index lists {wanted} with sha256 {entry['hashes']['sha256']}, not the pinned {sha256}")
    target = Path(dest) / entry["filename"]
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with urllib.request.urlopen(urljoin(page_url, entry["url"]), context=context, timeout=600) as response, \
            open(target, "wb") as out:
        while chunk := response.read(1 << 20):
            digest.update(chunk)
            out.write(chunk)
    if digest.hexdigest() != sha256:
        target.unlink()
        sys.exit(f"fetch-sdist: {wanted} has sha256 {digest.hexdigest()}, not the pinned {sha256}")
    print(target)


if __name__ == "__main__":
    if len(sys.argv) != 5:
        sys.exit(__doc__)
    main(*sys.argv[1:])
