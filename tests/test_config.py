"""QkvzFusionConfig: the cache key follows the dataclass, so a new field cannot silently miss it."""
import dataclasses

from fx_passes.config import NOT_IN_CACHE_KEY, QkvzFusionConfig


def _other(value):
    if isinstance(value, bool):
        return not value
    return (value or "") + "_other"


def test_cache_key_changes_with_every_field_that_shapes_the_rewrite():
    base = QkvzFusionConfig(dump_dir=None)
    for field in dataclasses.fields(base):
        changed = dataclasses.replace(base, **{field.name: _other(getattr(base, field.name))})
        if field.name in NOT_IN_CACHE_KEY:
            assert changed.cache_key() == base.cache_key(), field.name
        else:
            assert changed.cache_key() != base.cache_key(), field.name


def test_fields_left_out_of_the_key_exist():
    names = {field.name for field in dataclasses.fields(QkvzFusionConfig)}
    assert NOT_IN_CACHE_KEY <= names
