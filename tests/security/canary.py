"""The canary secrets every security test puts in the environment, and the search for them in everything written."""
from pathlib import Path

from conftest import events

CANARY = "hf_SecurityCanary0123456789abcdefXYZ"
OTHER_SECRET = "plain-secret-value-42"  # not token-shaped: masked because it is registered, not by its look
AWS_CANARY = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYCANARYKEY"  # an AWS secret access key's shape
ENV = {"HF_TOKEN": CANARY, "HUGGING_FACE_HUB_TOKEN": OTHER_SECRET, "AWS_SECRET_ACCESS_KEY": AWS_CANARY}
SECRETS = (CANARY, OTHER_SECRET, AWS_CANARY)


def assert_no_canary(*texts: str, dirs=(), uploads=None) -> None:
    """No canary in these texts, in any regular file under `dirs`, or in any upload the Hub stand-in received."""
    for text in texts:
        assert not any(secret in text for secret in SECRETS)
    for folder in dirs:
        for path in Path(folder).rglob("*"):
            if path.is_file() and not path.is_symlink():
                data = path.read_bytes()
                assert not any(secret.encode() in data for secret in SECRETS), path
    for repo, files in (uploads or {}).items():
        for name, data in files.items():
            assert not any(secret.encode() in data for secret in SECRETS), (repo, name)


def started(result) -> list[str]:
    return [e["stage"] for e in events(result.stdout) if e["event"] == "stage_started"]
