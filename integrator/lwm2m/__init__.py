"""LwM2M 1.1 server pieces: the object/resource model (`objects`), the content formats
(`formats`: OMA-TLV, SenML JSON/CBOR, OMA-JSON, text, opaque, CBOR, link-format) and the
small CBOR codec they share (`cbor`)."""
