"""The LwM2M resource model: object and resource definitions and the `Registry` of them.

Used by `integrator.lwm2m.formats` (value types for OMA-TLV, text, CBOR and for checking
SenML/JSON values) and by the LwM2M server (bootstrap writes, passive reporting of readable
objects, typing of Device Controller writes).

The embedded table follows the OMA LwM2M registry (github.com/OpenMobileAlliance/
lwm2m-registry) at the object versions LwM2M 1.1 clients implement: 0 Security 1.1, 1 Server
1.1, 2 Access Control, 3 Device, 4 Connectivity Monitoring 1.3, 5 Firmware Update 1.1,
6 Location, 7 Connectivity Statistics, 10 Cellular Connectivity 1.1 and the IPSO objects the
1NCE blueprints expose (3303, 3306, 3311, 3338, 3342, 3347). Extend it with
`Registry.with_objects` for custom objects.

Unknown resources: `Registry.resource` first looks in the object's definition; for an
unknown object (or a resource it does not define) a *reusable* resource id (>= 2048, the
IPSO range: 5700 Sensor Value is a Float in every object) resolves to the first definition
of that id in the registry. Anything else is `None`: the formats then keep the type the
payload carries (SenML, JSON, CBOR, text as a string) or, for OMA-TLV, the raw bytes.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

REUSABLE_MIN = 2048
"""Resource ids from here up are registered once for all objects (OMA "reusable resources")."""


class ResourceType(enum.StrEnum):
    """LwM2M 1.1 data types (Core Appendix C); NONE is an executable resource's."""

    STRING = "STRING"
    INTEGER = "INTEGER"
    UNSIGNED_INTEGER = "UNSIGNED_INTEGER"
    FLOAT = "FLOAT"
    BOOLEAN = "BOOLEAN"
    OPAQUE = "OPAQUE"
    TIME = "TIME"
    OBJLNK = "OBJLNK"
    CORELNK = "CORELNK"
    NONE = "NONE"


class Operations(enum.StrEnum):
    """Operations a LwM2M Server may perform; NONE: bootstrap-only (Security object)."""

    NONE = ""
    R = "R"
    W = "W"
    RW = "RW"
    E = "E"

    @property
    def readable(self) -> bool:
        return "R" in self.value

    @property
    def writable(self) -> bool:
        return "W" in self.value

    @property
    def executable(self) -> bool:
        return self is Operations.E


@dataclass(frozen=True, slots=True)
class ResourceDef:
    id: int
    name: str
    type: ResourceType
    multiple: bool = False
    operations: Operations = Operations.R


@dataclass(frozen=True, slots=True)
class ObjectDef:
    id: int
    name: str
    multiple: bool
    resources: tuple[ResourceDef, ...]
    version: str = "1.0"
    by_id: Mapping[int, ResourceDef] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_id = {r.id: r for r in self.resources}
        if len(by_id) != len(self.resources):
            raise ValueError(f"object {self.id}: duplicate resource ids")
        object.__setattr__(self, "by_id", MappingProxyType(by_id))

    def resource(self, rid: int) -> ResourceDef | None:
        return self.by_id.get(rid)

    @property
    def readable(self) -> tuple[ResourceDef, ...]:
        return tuple(r for r in self.resources if r.operations.readable)


class Registry:
    """Object definitions by id. Immutable once built; `with_objects` derives a new one."""

    __slots__ = ("_objects", "_reusable")

    def __init__(self, objects: Iterable[ObjectDef] = ()) -> None:
        self._objects: dict[int, ObjectDef] = {}
        for obj in objects:
            self._objects[obj.id] = obj
        self._reusable: dict[int, ResourceDef] = {}
        for obj in self._objects.values():
            for res in obj.resources:
                if res.id >= REUSABLE_MIN:
                    self._reusable.setdefault(res.id, res)

    @classmethod
    def default(cls) -> Registry:
        """The embedded table (see the module docstring)."""
        return cls(_OBJECTS)

    def with_objects(self, *objects: ObjectDef) -> Registry:
        """A registry with `objects` added, replacing definitions with the same id."""
        return Registry((*self._objects.values(), *objects))

    def get(self, oid: int) -> ObjectDef | None:
        return self._objects.get(oid)

    def resource(self, oid: int, rid: int) -> ResourceDef | None:
        """The definition of /oid/x/rid, falling back to the reusable resource `rid`."""
        obj = self._objects.get(oid)
        if obj is not None:
            res = obj.by_id.get(rid)
            if res is not None:
                return res
        return self._reusable.get(rid)

    def resource_type(self, oid: int, rid: int) -> ResourceType | None:
        res = self.resource(oid, rid)
        return None if res is None else res.type

    def __contains__(self, oid: object) -> bool:
        return oid in self._objects

    def __iter__(self) -> Iterator[ObjectDef]:
        return iter(sorted(self._objects.values(), key=lambda o: o.id))

    def __len__(self) -> int:
        return len(self._objects)


# -- the embedded table -------------------------------------------------------------------

_S, _I, _U, _F = (ResourceType.STRING, ResourceType.INTEGER,
                  ResourceType.UNSIGNED_INTEGER, ResourceType.FLOAT)
_B, _O, _T, _L = ResourceType.BOOLEAN, ResourceType.OPAQUE, ResourceType.TIME, ResourceType.OBJLNK
_X = ResourceType.NONE
_NO, _R, _W, _RW, _E = (Operations.NONE, Operations.R, Operations.W, Operations.RW,
                        Operations.E)


def _res(rid: int, name: str, ops: Operations, rtype: ResourceType,
         multiple: bool = False) -> ResourceDef:
    return ResourceDef(rid, name, rtype, multiple, ops)


def _ipso_sensor(oid: int, name: str) -> ObjectDef:
    """IPSO generic sensor layout (3303 Temperature v1.1 and its siblings)."""
    return ObjectDef(oid, name, True, (
        _res(5700, "Sensor Value", _R, _F),
        _res(5601, "Min Measured Value", _R, _F),
        _res(5602, "Max Measured Value", _R, _F),
        _res(5603, "Min Range Value", _R, _F),
        _res(5604, "Max Range Value", _R, _F),
        _res(5701, "Sensor Units", _R, _S),
        _res(5605, "Reset Min and Max Measured Values", _E, _X),
        _res(5750, "Application Type", _RW, _S),
        _res(5518, "Timestamp", _R, _T),
        _res(6050, "Fractional Timestamp", _R, _F),
        _res(6042, "Measurement Quality Indicator", _R, _I),
        _res(6049, "Measurement Quality Level", _R, _I),
    ), "1.1")


_OBJECTS: tuple[ObjectDef, ...] = (
    ObjectDef(0, "LwM2M Security", True, (
        _res(0, "LwM2M Server URI", _NO, _S),
        _res(1, "Bootstrap-Server", _NO, _B),
        _res(2, "Security Mode", _NO, _I),
        _res(3, "Public Key or Identity", _NO, _O),
        _res(4, "Server Public Key", _NO, _O),
        _res(5, "Secret Key", _NO, _O),
        _res(6, "SMS Security Mode", _NO, _I),
        _res(7, "SMS Binding Key Parameters", _NO, _O),
        _res(8, "SMS Binding Secret Key(s)", _NO, _O),
        _res(9, "LwM2M Server SMS Number", _NO, _S),
        _res(10, "Short Server ID", _NO, _I),
        _res(11, "Client Hold Off Time", _NO, _I),
        _res(12, "Bootstrap-Server Account Timeout", _NO, _I),
        _res(13, "Matching Type", _NO, _U),
        _res(14, "SNI", _NO, _S),
        _res(15, "Certificate Usage", _NO, _U),
        _res(16, "DTLS/TLS Ciphersuite", _NO, _U, multiple=True),
        _res(17, "OSCORE Security Mode", _NO, _L),
    ), "1.1"),
    ObjectDef(1, "LwM2M Server", True, (
        _res(0, "Short Server ID", _R, _I),
        _res(1, "Lifetime", _RW, _I),
        _res(2, "Default Minimum Period", _RW, _I),
        _res(3, "Default Maximum Period", _RW, _I),
        _res(4, "Disable", _E, _X),
        _res(5, "Disable Timeout", _RW, _I),
        _res(6, "Notification Storing When Disabled or Offline", _RW, _B),
        _res(7, "Binding", _RW, _S),
        _res(8, "Registration Update Trigger", _E, _X),
        _res(9, "Bootstrap-Request Trigger", _E, _X),
        _res(10, "APN Link", _RW, _L),
        _res(11, "TLS-DTLS Alert Code", _R, _U),
        _res(12, "Last Bootstrapped", _R, _T),
        _res(13, "Registration Priority Order", _NO, _U),
        _res(14, "Initial Registration Delay Timer", _NO, _U),
        _res(15, "Registration Failure Block", _NO, _B),
        _res(16, "Bootstrap on Registration Failure", _NO, _B),
        _res(17, "Communication Retry Count", _NO, _U),
        _res(18, "Communication Retry Timer", _NO, _U),
        _res(19, "Communication Sequence Delay Timer", _NO, _U),
        _res(20, "Communication Sequence Retry Count", _NO, _U),
        _res(21, "Trigger", _RW, _B),
        _res(22, "Preferred Transport", _RW, _S),
        _res(23, "Mute Send", _RW, _B),
    ), "1.1"),
    ObjectDef(2, "LwM2M Access Control", True, (
        _res(0, "Object ID", _R, _I),
        _res(1, "Object Instance ID", _R, _I),
        _res(2, "ACL", _RW, _I, multiple=True),
        _res(3, "Access Control Owner", _RW, _I),
    )),
    ObjectDef(3, "Device", False, (
        _res(0, "Manufacturer", _R, _S),
        _res(1, "Model Number", _R, _S),
        _res(2, "Serial Number", _R, _S),
        _res(3, "Firmware Version", _R, _S),
        _res(4, "Reboot", _E, _X),
        _res(5, "Factory Reset", _E, _X),
        _res(6, "Available Power Sources", _R, _I, multiple=True),
        _res(7, "Power Source Voltage", _R, _I, multiple=True),
        _res(8, "Power Source Current", _R, _I, multiple=True),
        _res(9, "Battery Level", _R, _I),
        _res(10, "Memory Free", _R, _I),
        _res(11, "Error Code", _R, _I, multiple=True),
        _res(12, "Reset Error Code", _E, _X),
        _res(13, "Current Time", _RW, _T),
        _res(14, "UTC Offset", _RW, _S),
        _res(15, "Timezone", _RW, _S),
        _res(16, "Supported Binding and Modes", _R, _S),
        _res(17, "Device Type", _R, _S),
        _res(18, "Hardware Version", _R, _S),
        _res(19, "Software Version", _R, _S),
        _res(20, "Battery Status", _R, _I),
        _res(21, "Memory Total", _R, _I),
        _res(22, "ExtDevInfo", _R, _L, multiple=True),
    ), "1.1"),
    ObjectDef(4, "Connectivity Monitoring", False, (
        _res(0, "Network Bearer", _R, _I),
        _res(1, "Available Network Bearer", _R, _I, multiple=True),
        _res(2, "Radio Signal Strength", _R, _I),
        _res(3, "Link Quality", _R, _I),
        _res(4, "IP Addresses", _R, _S, multiple=True),
        _res(5, "Router IP Addresses", _R, _S, multiple=True),
        _res(6, "Link Utilization", _R, _I),
        _res(7, "APN", _R, _S, multiple=True),
        _res(8, "Cell ID", _R, _I),
        _res(9, "SMNC", _R, _I),
        _res(10, "SMCC", _R, _I),
        _res(11, "SignalSNR", _R, _I),
        _res(12, "LAC", _R, _I),
        _res(13, "Coverage Enhancement Level", _R, _I),
    ), "1.3"),
    ObjectDef(5, "Firmware Update", False, (
        _res(0, "Package", _W, _O),
        _res(1, "Package URI", _RW, _S),
        _res(2, "Update", _E, _X),
        _res(3, "State", _R, _I),
        _res(5, "Update Result", _R, _I),
        _res(6, "PkgName", _R, _S),
        _res(7, "PkgVersion", _R, _S),
        _res(8, "Firmware Update Protocol Support", _R, _I, multiple=True),
        _res(9, "Firmware Update Delivery Method", _R, _I),
        _res(10, "Cancel", _E, _X),
        _res(11, "Severity", _RW, _I),
        _res(12, "Last State Change Time", _R, _T),
        _res(13, "Maximum Defer Period", _RW, _U),
    ), "1.1"),
    ObjectDef(6, "Location", False, (
        _res(0, "Latitude", _R, _F),
        _res(1, "Longitude", _R, _F),
        _res(2, "Altitude", _R, _F),
        _res(3, "Radius", _R, _F),
        _res(4, "Velocity", _R, _O),
        _res(5, "Timestamp", _R, _T),
        _res(6, "Speed", _R, _F),
    )),
    ObjectDef(7, "Connectivity Statistics", False, (
        _res(0, "SMS Tx Counter", _R, _I),
        _res(1, "SMS Rx Counter", _R, _I),
        _res(2, "Tx Data", _R, _I),
        _res(3, "Rx Data", _R, _I),
        _res(4, "Max Message Size", _R, _I),
        _res(5, "Average Message Size", _R, _I),
        _res(6, "Start", _E, _X),
        _res(7, "Stop", _E, _X),
        _res(8, "Collection Period", _RW, _I),
    )),
    ObjectDef(10, "LwM2M Cellular Connectivity", False, (
        _res(0, "SMSC address", _RW, _S),
        _res(1, "Disable radio period", _RW, _I),
        _res(2, "Module activation code", _RW, _S),
        _res(3, "Vendor specific extensions", _R, _L),
        _res(4, "PSM Timer", _RW, _I),
        _res(5, "Active Timer", _RW, _I),
        _res(7, "eDRX parameters for Iu mode", _RW, _O),
        _res(8, "eDRX parameters for WB-S1 mode", _RW, _O),
        _res(9, "eDRX parameters for NB-S1 mode", _RW, _O),
        _res(10, "eDRX parameters for A/Gb mode", _RW, _O),
        _res(11, "Activated Profile Names", _R, _L, multiple=True),
        _res(12, "Supported Power Saving Modes", _R, _U),
        _res(13, "Active Power Saving Modes", _RW, _U),
        _res(14, "Release Assistance Indication Usage", _RW, _U),
    ), "1.1"),
    _ipso_sensor(3303, "Temperature"),
    ObjectDef(3306, "Actuation", True, (
        _res(5850, "On/Off", _RW, _B),
        _res(5851, "Dimmer", _RW, _I),
        _res(5852, "On time", _RW, _I),
        _res(5853, "Multi-state Output", _RW, _S),
        _res(5750, "Application Type", _RW, _S),
        _res(5518, "Timestamp", _R, _T),
        _res(6050, "Fractional Timestamp", _R, _F),
    )),
    ObjectDef(3311, "Light Control", True, (
        _res(5850, "On/Off", _RW, _B),
        _res(5851, "Dimmer", _RW, _I),
        _res(5852, "On time", _RW, _I),
        _res(5805, "Cumulative active power", _R, _F),
        _res(5820, "Power factor", _R, _F),
        _res(5706, "Colour", _RW, _S),
        _res(5701, "Sensor Units", _R, _S),
        _res(5750, "Application Type", _RW, _S),
    )),
    ObjectDef(3338, "Buzzer", True, (
        _res(5850, "On/Off", _RW, _B),
        _res(5548, "Level", _RW, _F),
        _res(5521, "Delay Duration", _RW, _F),
        _res(5525, "Minimum Off-time", _RW, _F),
        _res(5750, "Application Type", _RW, _S),
    )),
    ObjectDef(3342, "On/Off switch", True, (
        _res(5500, "Digital Input State", _R, _B),
        _res(5501, "Digital Input Counter", _R, _I),
        _res(5852, "On time", _RW, _I),
        _res(5854, "Off Time", _RW, _I),
        _res(5750, "Application Type", _RW, _S),
    )),
    ObjectDef(3347, "Push button", True, (
        _res(5500, "Digital Input State", _R, _B),
        _res(5501, "Digital Input Counter", _R, _I),
        _res(5750, "Application Type", _RW, _S),
        _res(5518, "Timestamp", _R, _T),
        _res(6050, "Fractional Timestamp", _R, _F),
    )),
)
