"""The dotted keys of the configuration (`train.lr`, `train.early_stopping.patience`) and, for a key that is not
one, the keys it probably meant."""

from __future__ import annotations

from pydantic import BaseModel

from imgclf.config.sections import RunConfig
from imgclf.errors import ConfigError

__all__ = ["all_keys", "check_key", "unknown_key"]


def all_keys() -> list[str]:
    """Every dotted configuration key (`train.lr`, `train.early_stopping.patience`, ...)."""

    def walk(model: type[BaseModel], prefix: str) -> list[str]:
        keys = []
        for name, info in model.model_fields.items():
            kind = info.annotation
            if isinstance(kind, type) and issubclass(kind, BaseModel):
                keys += walk(kind, f"{prefix}{name}.")
            else:
                keys.append(f"{prefix}{name}")
        return keys

    return walk(RunConfig, "")


def check_key(key: str, where: str = "config") -> None:
    """Raise a ConfigError naming `key` and the closest valid keys unless it is a dotted config key (a leaf)."""
    if key not in all_keys():
        raise ConfigError(f"{where}: {unknown_key(key)}")


def unknown_key(key: str) -> str:
    hint = _closest_keys(key)
    return (
        f"unknown key '{key}'"
        + (f"; did you mean {' or '.join(hint)}?" if hint else "")
        + " (`imgclf config` lists every key)"
    )


# What people type for our keys (other tools' names): `train.learning_rate` means `train.lr`.
_SYNONYMS = {
    "learning_rate": "lr",
    "bs": "batch_size",
    "batch": "batch_size",
    "wd": "weight_decay",
    "num_epochs": "epochs",
    "max_epochs": "epochs",
    "image_size": "img_size",
    "imgsz": "img_size",
    "size": "img_size",
    "workers": "num_workers",
    "augmentation": "preset",
    "arch": "name",
    "architecture": "name",
    "model": "name",
}


def _closest_keys(key: str) -> list[str]:
    """Valid keys a mistyped or misplaced one probably meant: the same last name in another section
    (`epochs` -> `train.epochs`), another tool's name for it (`train.learning_rate` -> `train.lr`), else close
    spellings, within its section first."""
    import difflib

    keys = all_keys()
    last = key.rsplit(".", 1)[-1]
    for name in (last, _SYNONYMS.get(last.lower())):
        same_name = [k for k in keys if name and k.rsplit(".", 1)[-1] == name]
        if same_name:
            section = key.split(".", 1)[0]
            return sorted(same_name, key=lambda k: not k.startswith(section + "."))
    section_keys = [k for k in keys if k.startswith(key.rsplit(".", 1)[0] + ".")] if "." in key else keys
    close = difflib.get_close_matches(key, section_keys, n=3, cutoff=0.6)
    return close or difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
