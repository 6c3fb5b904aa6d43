"""The embedded LwM2M object table and the Registry lookups."""

from __future__ import annotations

import pytest

from integrator.lwm2m.objects import (
    ObjectDef,
    Operations,
    Registry,
    ResourceDef,
    ResourceType,
)

T = ResourceType


@pytest.fixture(scope="module")
def registry() -> Registry:
    return Registry.default()


def test_objects_1nce_devices_use_are_present(registry: Registry) -> None:
    for oid in (0, 1, 2, 3, 4, 5, 6, 7, 10, 3303, 3311, 3338, 3342, 3347):
        assert oid in registry, oid
    assert [o.id for o in registry] == sorted(o.id for o in registry)


@pytest.mark.parametrize(("oid", "rid", "rtype", "multiple", "ops"), [
    # OMA registry, object versions implemented by LwM2M 1.1 clients
    (0, 0, T.STRING, False, Operations.NONE),      # Server URI: bootstrap-only
    (0, 1, T.BOOLEAN, False, Operations.NONE),
    (0, 3, T.OPAQUE, False, Operations.NONE),      # PSK identity
    (0, 5, T.OPAQUE, False, Operations.NONE),      # secret key
    (0, 10, T.INTEGER, False, Operations.NONE),    # short server id (1111/2222)
    (0, 16, T.UNSIGNED_INTEGER, True, Operations.NONE),
    (1, 0, T.INTEGER, False, Operations.R),
    (1, 1, T.INTEGER, False, Operations.RW),       # lifetime: Integer in object 1 v1.1
    (1, 8, T.NONE, False, Operations.E),
    (1, 12, T.TIME, False, Operations.R),
    (1, 23, T.BOOLEAN, False, Operations.RW),
    (2, 2, T.INTEGER, True, Operations.RW),
    (3, 0, T.STRING, False, Operations.R),
    (3, 4, T.NONE, False, Operations.E),
    (3, 6, T.INTEGER, True, Operations.R),
    (3, 7, T.INTEGER, True, Operations.R),
    (3, 11, T.INTEGER, True, Operations.R),
    (3, 13, T.TIME, False, Operations.RW),
    (3, 22, T.OBJLNK, True, Operations.R),
    (4, 2, T.INTEGER, False, Operations.R),
    (4, 4, T.STRING, True, Operations.R),
    (4, 8, T.INTEGER, False, Operations.R),
    (5, 0, T.OPAQUE, False, Operations.W),
    (5, 3, T.INTEGER, False, Operations.R),
    (5, 8, T.INTEGER, True, Operations.R),
    (5, 13, T.UNSIGNED_INTEGER, False, Operations.RW),
    (6, 0, T.FLOAT, False, Operations.R),
    (6, 1, T.FLOAT, False, Operations.R),
    (6, 4, T.OPAQUE, False, Operations.R),
    (6, 5, T.TIME, False, Operations.R),
    (7, 6, T.NONE, False, Operations.E),
    (7, 8, T.INTEGER, False, Operations.RW),
    (10, 4, T.INTEGER, False, Operations.RW),
    (10, 11, T.OBJLNK, True, Operations.R),
    (10, 12, T.UNSIGNED_INTEGER, False, Operations.R),
    (3303, 5700, T.FLOAT, False, Operations.R),
    (3303, 5605, T.NONE, False, Operations.E),
    (3311, 5850, T.BOOLEAN, False, Operations.RW),
    (3311, 5851, T.INTEGER, False, Operations.RW),
    (3311, 5706, T.STRING, False, Operations.RW),
    (3338, 5548, T.FLOAT, False, Operations.RW),
    (3342, 5500, T.BOOLEAN, False, Operations.R),
    (3347, 5501, T.INTEGER, False, Operations.R),
    (3347, 5518, T.TIME, False, Operations.R),
])
def test_resource_definitions(registry: Registry, oid: int, rid: int, rtype: ResourceType,
                              multiple: bool, ops: Operations) -> None:
    res = registry.resource(oid, rid)
    assert res is not None
    assert (res.type, res.multiple, res.operations) == (rtype, multiple, ops)


def test_object_multiplicity(registry: Registry) -> None:
    multiple = {o.id: o.multiple for o in registry}
    assert multiple[0] and multiple[1] and multiple[2] and multiple[3303] and multiple[3347]
    assert not (multiple[3] or multiple[4] or multiple[5] or multiple[6] or multiple[10])


def test_reusable_resource_fallback(registry: Registry) -> None:
    # 3304 Humidity is not embedded: its IPSO resources keep their registry-wide types
    assert registry.get(3304) is None
    assert registry.resource_type(3304, 5700) is T.FLOAT
    assert registry.resource_type(3304, 5701) is T.STRING
    assert registry.resource_type(3200, 5500) is T.BOOLEAN
    # below the reusable range nothing is guessed
    assert registry.resource(40000, 1) is None
    assert registry.resource(3, 99) is None
    assert registry.resource_type(3, 99) is None


def test_with_objects_adds_and_replaces(registry: Registry) -> None:
    custom = ObjectDef(33000, "Custom", True, (ResourceDef(0, "Level", T.FLOAT),))
    patched = ObjectDef(3, "Device", False, (ResourceDef(9, "Battery", T.FLOAT),))
    derived = registry.with_objects(custom, patched)
    assert derived.resource_type(33000, 0) is T.FLOAT
    assert derived.resource_type(3, 9) is T.FLOAT
    assert derived.resource(3, 0) is None
    assert registry.resource_type(3, 9) is T.INTEGER  # the original is untouched
    assert len(derived) == len(registry) + 1


def test_object_def_helpers(registry: Registry) -> None:
    device = registry.get(3)
    assert device is not None and device.name == "Device"
    readable = {r.id for r in device.readable}
    assert 9 in readable and 4 not in readable and 13 in readable
    assert Operations.RW.readable and Operations.RW.writable and not Operations.RW.executable
    assert Operations.E.executable and not Operations.NONE.readable
    with pytest.raises(ValueError, match="duplicate"):
        ObjectDef(1, "x", False, (ResourceDef(0, "a", T.STRING), ResourceDef(0, "b", T.STRING)))
