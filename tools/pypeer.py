#!/usr/bin/env python3
"""pypeer: an independent meshwork peer, written from docs/protocol.md and the
proto files alone, to check that the wire specification is enough to talk to a
real node.

Standard library only, except the optional `cryptography` package (X25519,
AES-GCM, Ed25519, ChaCha20-Poly1305): with it the peer speaks Noise
(`Noise_XXpsk0_25519_AESGCM_BLAKE2s`) and checks flood signatures; without it,
only plaintext mode works and signature checks are skipped. Protobuf is encoded
and decoded by hand (a ~100-line codec below).

What it checks against a running node (each step prints `ok` or `FAIL`):

  1. TCP connect, the 8-byte preamble both ways (protocol.md 5.1.1);
  2. in Noise mode, the XXpsk0 handshake with the PSK of 5.1.2 (network key
     optional) and transport messages (5.1.3);
  3. the Hello exchange as initiator (5.2), with the sync layer's required
     metadata (11.4);
  4. answering the node's Pings (its heartbeats), sending Pings and matching
     Pongs (5.3), and the count of peers the node's Hello and Pongs carry
     (4.2, 4.3; ours go in ours);
  5. receiving a non-empty Discovered, and asking with an empty one (4.4, 9.2);
  6. a Concern request to the node's `echo` concern (command 0x100) and its
     reply; an unknown command answered ERROR/UNKNOWN_COMMAND (10.1);
  7. a broadcast flooded by the node (`POST /broadcast` on its admin API):
     received as a Flooded frame, its XEdDSA signature checked as Ed25519 (10.2);
     and a flood signed here (XEdDSA in pure Python) delivered by the node;
  8. the replicated map (11): our replica answers the node's anti-entropy
     (DigestQuery, Pull, Entries); we write a key with a Push and with a
     confirm (Entries -> Ack), read a key the node wrote (admin PUT) with
     DigestQuery/Pull/Chunk, and check our root equals the node's (the
     entry-hash rule of 11.2);
  9. RPC (12): Call `demo.echo`, `demo.add`, `demo.fail`, an unknown method,
     a wrong version and an unknown service with the JSON codec (the node
     needs `--serve-demo`), and the service's registry entry in the map;
 10. a topic publication (`POST /publish/...`) as a flood carrying Published
     (10.4);
 11. with a second node known (`--expect-discovered`): a signed RouteQuery for
     it, the target-signed RouteFound, and a request to its echo concern
     sealed end to end (Routed, 10.3.1) whose sealed reply opens;
 12. a graceful close with Disconnect(SHUTDOWN) (5.5);
 13. `--negative`: the node's refusals in the handshake (WRONG_NETWORK,
     INCOMPATIBLE_VERSION, INCOMPATIBLE_SETTINGS, SELF_CONNECTION,
     PROTOCOL_ERROR) and its PROTOCOL_ERROR for invalid frames (zero length,
     over-long prefixes, unknown body, enum 0 or unknown, malformed protobuf,
     bad UTF-8, EOF inside a frame), two body fields (the last wins), unknown
     fields skipped, and bad preambles (closed without a frame);
 14. `--listen HOST:PORT`: instead of dialling, wait for a node started with
     `--seed tcp://HOST:PORT` to dial us and run the checks as the responder.

Run it against a node (build: cargo build --release -p meshwork-cli):

    target/release/meshwork node --insecure --listen tcp://127.0.0.1:7000 \\
        --admin 127.0.0.1:9000 --serve-demo
    target/release/meshwork node --insecure --listen tcp://127.0.0.1:7001 \\
        --seed tcp://127.0.0.1:7000 --admin 127.0.0.1:9001
    python3 tools/pypeer.py --insecure --node 127.0.0.1:7000 --admin 127.0.0.1:9000 \\
        --expect-discovered --negative

Without `--insecure` on both, the connection uses Noise; `--network-key FILE`
must then name the node's network key file if it has one. `--network ID` if the
node runs another network id than the default, `--no-leasing` if it runs with
`--no-leasing`. It ends with "N passed, N failed" and exits 0 when every check
passed; `info` lines are observations the spec does not require. `-v` prints
every frame.
"""

import argparse
import hashlib
import hmac
import json
import secrets
import socket
import struct
import sys
import time
import urllib.error
import urllib.request

try:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.asymmetric.x25519 import (
        X25519PrivateKey,
        X25519PublicKey,
    )
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    HAVE_CRYPTO = True
except ImportError:  # plaintext mode only
    HAVE_CRYPTO = False

VERBOSE = False


def log(*a):
    if VERBOSE:
        print("   ", *a, flush=True)


# --------------------------------------------------------------------------
# Protobuf: a minimal codec driven by small schemas (field number -> name, type).

def enc_varint(n):
    if n < 0:
        n &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def dec_varint(buf, i):
    shift = n = 0
    while True:
        if i >= len(buf):
            raise ValueError("truncated varint")
        b = buf[i]
        i += 1
        n |= (b & 0x7F) << shift
        if not b & 0x80:
            return n & ((1 << 64) - 1), i
        shift += 7
        if shift >= 70:
            raise ValueError("varint too long")


def zigzag(n):
    return (n << 1) ^ (n >> 63)


def unzigzag(n):
    return (n >> 1) ^ -(n & 1)


# Schema types: 'u' (varint), 's' (sint64, zigzag), 'b' (bool), 'y' (bytes),
# 't' (string), 'f64' (fixed64), a dict (nested message), ('map', kt, vt).
# A field name ending in '*' is repeated.
PEER_COUNT = {1: ("linked", "u"), 2: ("min_peers", "u")}
HELLO = {1: ("protocol_version", "u"), 2: ("network_id", "t"), 3: ("node_id", "y"),
         4: ("listen_addrs*", "t"), 5: ("metadata", ("map", "t", "t")), 6: ("capabilities", "u"),
         7: ("peer_count", PEER_COUNT)}
PING = {1: ("nonce", "u"), 2: ("timestamp_micros", "u")}
PONG = {1: ("nonce", "u"), 2: ("timestamp_micros", "u"), 3: ("peer_count", PEER_COUNT)}
PEERINFO = {1: ("node_id", "y"), 2: ("addrs*", "t"), 3: ("age_ms", "u")}
DISCOVERED = {1: ("peers*", PEERINFO)}
DISCONNECT = {1: ("reason", "u"), 2: ("message", "t"), 3: ("alternatives*", PEERINFO)}
CONCERN = {1: ("command", "u"), 2: ("request_id", "u"), 3: ("kind", "u"), 4: ("ttl", "u"),
           5: ("flags", "u"), 6: ("payload", "y")}
ENVELOPE = {1: ("hello", HELLO), 2: ("ping", PING), 3: ("pong", PONG), 4: ("discovered", DISCOVERED),
            5: ("disconnect", DISCONNECT), 6: ("concern", CONCERN)}
CONCERN_ERROR = {1: ("code", "u"), 2: ("message", "t")}
FLOODED = {1: ("origin", "y"), 2: ("message_id", "u"), 3: ("command", "u"), 4: ("payload", "y"),
           5: ("ttl", "u"), 6: ("sent_at_ms", "u"), 7: ("signature", "y")}
ENTRY = {1: ("key", "y"), 2: ("value", "y"), 3: ("deleted", "b"), 4: ("stamp", "u"), 5: ("writer", "y"),
         6: ("epoch", "u"), 7: ("claim_delta", "u"), 8: ("lease_delta", "s"), 9: ("expires_delta", "s"),
         10: ("ttl_ms", "u"), 11: ("no_lease", "b")}
SYNC = {7: ("push", {1: ("id", "f64"), 2: ("origin", "y"), 3: ("entries*", ENTRY)}),
        8: ("prune", {}), 9: ("graft", {}),
        1: ("entries", {1: ("entries*", ENTRY), 2: ("repair", "b")}),
        2: ("digest", {1: ("root", "u")}),
        3: ("answer", {1: ("equal", "b"), 2: ("buckets*", "u"), 3: ("entries", "u")}),
        4: ("pull", {1: ("buckets*", "u"), 2: ("after_bucket", "u"), 3: ("after_key", "y"), 4: ("resume", "b")}),
        5: ("chunk", {1: ("entries*", ENTRY), 2: ("more", "b"), 3: ("next_bucket", "u"), 4: ("next_key", "y")}),
        6: ("ack", {1: ("applied", "u"), 2: ("newer*", ENTRY)})}
FAILURE = {1: ("code", "u"), 2: ("message", "t"), 3: ("version", "u")}
RPC = {1: ("call", {1: ("call_id", "u"), 2: ("service", "t"), 3: ("method", "t"), 4: ("args", "y"),
                    5: ("codec", "u"), 6: ("budget_ms", "u"), 7: ("version", "u")}),
       2: ("cancel", {1: ("call_id", "u")}),
       3: ("outcome", {1: ("ok", "y"), 2: ("app_error", "y"), 3: ("failure", FAILURE)})}
ROUTE_QUERY = {1: ("query_id", "u"), 2: ("origin", "y"), 3: ("target", "y"), 4: ("ttl", "u"),
               5: ("sent_at_ms", "u"), 6: ("signature", "y")}
ROUTE_FOUND = {1: ("query_id", "u"), 2: ("origin", "y"), 3: ("target", "y"), 4: ("hops", "u"),
               5: ("signature", "y")}
ROUTED = {1: ("origin", "y"), 2: ("target", "y"), 3: ("command", "u"), 4: ("request_id", "u"), 5: ("kind", "u"),
          6: ("payload", "y"), 7: ("ttl", "u"), 8: ("sent_at_ms", "u")}
ROUTE = {1: ("query", ROUTE_QUERY), 2: ("found", ROUTE_FOUND), 3: ("routed", ROUTED),
         4: ("not_found", {1: ("query_id", "u"), 2: ("origin", "y"), 3: ("target", "y")})}
PUBLISHED = {1: ("topic", "t"), 2: ("payload", "y")}


def encode(schema, msg):
    """Encode dict `msg` with `schema`. Scalars equal to their default are omitted,
    except fields of a oneof (pass them as nested dicts: always written)."""
    out = bytearray()
    for num in sorted(schema):
        name, typ = schema[num]
        rep = name.endswith("*")
        name = name.rstrip("*")
        if name not in msg:
            continue
        v = msg[name]
        if isinstance(typ, tuple) and typ[0] == "map":
            for k in sorted(v):
                inner = encode({1: ("k", typ[1]), 2: ("v", typ[2])}, {"k": k, "v": v[k]})
                out += enc_varint(num << 3 | 2) + enc_varint(len(inner)) + inner
            continue
        vals = v if rep else [v]
        if rep and typ in ("u", "s") and vals:  # packed
            body = b"".join(enc_varint(zigzag(x) if typ == "s" else x) for x in vals)
            out += enc_varint(num << 3 | 2) + enc_varint(len(body)) + body
            continue
        for x in vals:
            if isinstance(typ, dict):
                inner = encode(typ, x)
                out += enc_varint(num << 3 | 2) + enc_varint(len(inner)) + inner
            elif typ in ("u", "s", "b"):
                if not rep and not x:
                    continue
                n = zigzag(x) if typ == "s" else int(x)
                out += enc_varint(num << 3) + enc_varint(n)
            elif typ == "f64":
                if not rep and not x:
                    continue
                out += enc_varint(num << 3 | 1) + struct.pack("<Q", x)
            else:  # bytes or string
                x = x.encode() if isinstance(x, str) else x
                if not rep and not x:
                    continue
                out += enc_varint(num << 3 | 2) + enc_varint(len(x)) + x
    return bytes(out)


def decode(schema, buf):
    """Decode `buf`; returns a dict with only the fields present (repeated: lists).
    Unknown fields are skipped; a wrong wire type or truncation raises ValueError."""
    msg = {}
    i = 0
    while i < len(buf):
        key, i = dec_varint(buf, i)
        num, wt = key >> 3, key & 7
        if num == 0:
            raise ValueError("field number 0")
        if wt == 0:
            val, i = dec_varint(buf, i)
        elif wt == 1:
            if i + 8 > len(buf):
                raise ValueError("truncated fixed64")
            val = struct.unpack_from("<Q", buf, i)[0]
            i += 8
        elif wt == 5:
            if i + 4 > len(buf):
                raise ValueError("truncated fixed32")
            val = struct.unpack_from("<I", buf, i)[0]
            i += 4
        elif wt == 2:
            n, i = dec_varint(buf, i)
            if i + n > len(buf):
                raise ValueError("length past the end")
            val = bytes(buf[i:i + n])
            i += n
        else:
            raise ValueError("wire type %d" % wt)
        if num not in schema:
            continue
        name, typ = schema[num]
        rep = name.endswith("*")
        name = name.rstrip("*")
        if isinstance(typ, tuple) and typ[0] == "map":
            e = decode({1: ("k", typ[1]), 2: ("v", typ[2])}, val)
            msg.setdefault(name, {})[e.get("k", "")] = e.get("v", "")
            continue
        if isinstance(typ, dict):
            if wt != 2:
                raise ValueError("wrong wire type for %s" % name)
            x = decode(typ, val)
            if rep:
                msg.setdefault(name, []).append(x)
            else:  # oneof member or singular message; the last one wins (merging ignored)
                msg.pop(name, None)  # re-inserted last, so body_of() sees wire order
                msg[name] = x
            continue
        if typ in ("u", "s", "b"):
            if wt == 2 and rep:  # packed
                xs, j = [], 0
                while j < len(val):
                    x, j = dec_varint(val, j)
                    xs.append(unzigzag(x) if typ == "s" else x)
                msg.setdefault(name, []).extend(xs)
                continue
            if wt != 0:
                raise ValueError("wrong wire type for %s" % name)
            x = unzigzag(val) if typ == "s" else (bool(val) if typ == "b" else val)
        elif typ == "f64":
            if wt != 1:
                raise ValueError("wrong wire type for %s" % name)
            x = val
        else:
            if wt != 2:
                raise ValueError("wrong wire type for %s" % name)
            x = val.decode("utf-8") if typ == "t" else val  # invalid UTF-8 raises
        if rep:
            msg.setdefault(name, []).append(x)
        else:
            msg[name] = x
    return msg


def body_of(env):
    """The one body field of a decoded Envelope / SyncMessage / RpcMessage (name, msg).
    Protobuf oneof: the last body field on the wire wins; our decoder keeps a dict
    in wire order, so the last key inserted wins."""
    if not env:
        return None, None
    name = list(env)[-1]
    return name, env[name]


# --------------------------------------------------------------------------
# Crypto helpers: HKDF over HMAC-BLAKE2s (Noise), XEdDSA.

def blake2s(data):
    return hashlib.blake2s(data).digest()


def hmac_blake2s(key, data):
    return hmac.new(key, data, hashlib.blake2s).digest()


def noise_hkdf(ck, ikm, n):
    temp = hmac_blake2s(ck, ikm)
    out1 = hmac_blake2s(temp, b"\x01")
    out2 = hmac_blake2s(temp, out1 + b"\x02")
    if n == 2:
        return out1, out2
    out3 = hmac_blake2s(temp, out2 + b"\x03")
    return out1, out2, out3


class CipherState:
    def __init__(self, k=None):
        self.k = k
        self.n = 0

    def _nonce(self):
        if self.n >= (1 << 64) - 1:
            raise ValueError("nonce exhausted")
        return b"\x00" * 4 + struct.pack(">Q", self.n)

    def encrypt(self, ad, pt):
        if self.k is None:
            return pt
        ct = AESGCM(self.k).encrypt(self._nonce(), pt, ad)
        self.n += 1
        return ct

    def decrypt(self, ad, ct):
        if self.k is None:
            return ct
        pt = AESGCM(self.k).decrypt(self._nonce(), ct, ad)  # raises InvalidTag
        self.n += 1
        return pt


PROTOCOL_NAME = b"Noise_XXpsk0_25519_AESGCM_BLAKE2s"


def x25519_pub(priv):
    return priv.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


class NoiseXXpsk0:
    """Noise_XXpsk0_25519_AESGCM_BLAKE2s with empty payloads (protocol.md 5.1.2)."""

    def __init__(self, initiator, static_priv, prologue, psk):
        self.initiator = initiator
        self.s = static_priv
        self.psk = psk
        self.h = PROTOCOL_NAME.ljust(32, b"\x00") if len(PROTOCOL_NAME) <= 32 else blake2s(PROTOCOL_NAME)
        self.ck = self.h
        self.cs = CipherState()
        self.mix_hash(prologue)
        self.e = None
        self.re = None
        self.rs = None

    def mix_hash(self, data):
        self.h = blake2s(self.h + data)

    def mix_key(self, ikm):
        self.ck, k = noise_hkdf(self.ck, ikm, 2)
        self.cs = CipherState(k)

    def mix_key_and_hash(self, ikm):
        self.ck, th, k = noise_hkdf(self.ck, ikm, 3)
        self.mix_hash(th)
        self.cs = CipherState(k)

    def enc_and_hash(self, pt):
        ct = self.cs.encrypt(self.h, pt)
        self.mix_hash(ct)
        return ct

    def dec_and_hash(self, ct):
        pt = self.cs.decrypt(self.h, ct)
        self.mix_hash(ct)
        return pt

    @staticmethod
    def dh(priv, pub):
        return priv.exchange(X25519PublicKey.from_public_bytes(pub))

    # message 1: -> psk, e
    def write1(self):
        self.mix_key_and_hash(self.psk)
        self.e = X25519PrivateKey.generate()
        epub = x25519_pub(self.e)
        self.mix_hash(epub)
        self.mix_key(epub)  # psk modifier: "e" also mixes the key
        return epub + self.enc_and_hash(b"")

    def read1(self, msg):
        self.mix_key_and_hash(self.psk)
        self.re = msg[:32]
        self.mix_hash(self.re)
        self.mix_key(self.re)
        self.dec_and_hash(msg[32:])

    # message 2: <- e, ee, s, es
    def write2(self):
        self.e = X25519PrivateKey.generate()
        epub = x25519_pub(self.e)
        self.mix_hash(epub)
        self.mix_key(epub)
        self.mix_key(self.dh(self.e, self.re))
        sct = self.enc_and_hash(x25519_pub(self.s))
        self.mix_key(self.dh(self.s, self.re))
        return epub + sct + self.enc_and_hash(b"")

    def read2(self, msg):
        self.re = msg[:32]
        self.mix_hash(self.re)
        self.mix_key(self.re)
        self.mix_key(self.dh(self.e, self.re))
        self.rs = self.dec_and_hash(msg[32:80])
        self.mix_key(self.dh(self.e, self.rs))
        self.dec_and_hash(msg[80:])

    # message 3: -> s, se
    def write3(self):
        sct = self.enc_and_hash(x25519_pub(self.s))
        self.mix_key(self.dh(self.s, self.re))
        return sct + self.enc_and_hash(b"")

    def read3(self, msg):
        self.rs = self.dec_and_hash(msg[:48])
        self.mix_key(self.dh(self.e, self.rs))
        self.dec_and_hash(msg[48:])

    def split(self):
        k1, k2 = noise_hkdf(self.ck, b"", 2)
        c1, c2 = CipherState(k1), CipherState(k2)
        return (c1, c2) if self.initiator else (c2, c1)  # (send, recv)


def network_secret(path):
    """security.md 2.2: lines trimmed, empty and '#' lines dropped, joined with newlines."""
    lines = [ln.strip() for ln in open(path, encoding="utf-8").read().splitlines()]
    return "\n".join(ln for ln in lines if ln and not ln.startswith("#")).encode()


def noise_psk(secret=None):
    if secret is None:
        return hashlib.sha256(b"meshwork/noise-psk/v1" + b"\x00").digest()
    return hashlib.sha256(b"meshwork/noise-psk/v1" + b"\x01" + hashlib.sha256(secret).digest()).digest()


# Ed25519 arithmetic for XEdDSA (Signal's XEdDSA, revision 1), pure Python.
P = 2 ** 255 - 19
Q = 2 ** 252 + 27742317777372353535851937790883648493
D = -121665 * pow(121666, P - 2, P) % P
GY = 4 * pow(5, P - 2, P) % P


def _xrecover(y, sign):
    xx = (y * y - 1) * pow(D * y * y + 1, P - 2, P) % P
    x = pow(xx, (P + 3) // 8, P)
    if (x * x - xx) % P:
        x = x * pow(2, (P - 1) // 4, P) % P
    if (x * x - xx) % P:
        raise ValueError("not a point")
    if x & 1 != sign:
        x = P - x
    return x


G = (_xrecover(GY, 0), GY, 1, _xrecover(GY, 0) * GY % P)


def _add(p1, p2):
    x1, y1, z1, t1 = p1
    x2, y2, z2, t2 = p2
    a = (y1 - x1) * (y2 - x2) % P
    b = (y1 + x1) * (y2 + x2) % P
    c = 2 * t1 * t2 * D % P
    d = 2 * z1 * z2 % P
    e, f, g, h = b - a, d - c, d + c, b + a
    return (e * f % P, g * h % P, f * g % P, e * h % P)


def _mul(k, pt):
    r = (0, 1, 1, 0)
    while k:
        if k & 1:
            r = _add(r, pt)
        pt = _add(pt, pt)
        k >>= 1
    return r


def _encode_point(pt):
    x, y, z, _ = pt
    zi = pow(z, P - 2, P)
    x, y = x * zi % P, y * zi % P
    return (y | ((x & 1) << 255)).to_bytes(32, "little")


def xeddsa_sign(x25519_secret32, msg):
    k = int.from_bytes(x25519_secret32, "little")
    k &= ~7
    k &= (1 << 254) - 1
    k |= 1 << 254  # clamped Montgomery scalar
    e = _encode_point(_mul(k, G))
    a = (Q - k % Q) % Q if e[31] & 0x80 else k % Q
    A = bytes(e[:31]) + bytes([e[31] & 0x7F])
    z = secrets.token_bytes(64)
    r = int.from_bytes(hashlib.sha512(b"\xfe" + b"\xff" * 31 + a.to_bytes(32, "little") + msg + z).digest(),
                       "little") % Q
    R = _encode_point(_mul(r, G))
    h = int.from_bytes(hashlib.sha512(R + A + msg).digest(), "little") % Q
    s = (r + h * a) % Q
    return R + s.to_bytes(32, "little")


def xeddsa_verify(u_bytes, msg, sig):
    """Convert the Montgomery u to the Edwards y (sign bit 0), then check as Ed25519."""
    if len(u_bytes) != 32 or len(sig) != 64:
        return False
    u = int.from_bytes(u_bytes, "little")
    if u >= P:
        return False
    y = (u - 1) * pow(u + 1, P - 2, P) % P
    A = y.to_bytes(32, "little")
    if HAVE_CRYPTO:
        try:
            Ed25519PublicKey.from_public_bytes(A).verify(sig, msg)
            return True
        except (InvalidSignature, ValueError):
            return False
    # pure-Python check: [s]B == R + [h]A
    try:
        ax = _xrecover(y, 0)
        ry = int.from_bytes(sig[:32], "little")
        rx = _xrecover(ry & ((1 << 255) - 1), ry >> 255)
    except ValueError:
        return False
    s = int.from_bytes(sig[32:], "little")
    if s >= Q:
        return False
    h = int.from_bytes(hashlib.sha512(sig[:32] + A + msg).digest(), "little") % Q
    lhs = _encode_point(_mul(s, G))
    rhs = _encode_point(_add((rx, ry & ((1 << 255) - 1), 1, rx * (ry & ((1 << 255) - 1)) % P),
                             _mul(h, (ax, y, 1, ax * y % P))))
    return lhs == rhs


def flood_signed_bytes(f):
    o = f.get("origin", b"")
    return (b"meshwork flood v1" + bytes([len(o)]) + o + struct.pack(">Q", f.get("message_id", 0))
            + struct.pack(">I", f.get("command", 0)) + struct.pack(">Q", f.get("sent_at_ms", 0))
            + f.get("payload", b""))


def lenb(b):
    return bytes([len(b)]) + b


def route_query_signed_bytes(q):
    return (b"meshwork route query v1" + lenb(q.get("origin", b"")) + lenb(q.get("target", b""))
            + struct.pack(">QQ", q.get("query_id", 0), q.get("sent_at_ms", 0)))


def route_found_signed_bytes(f):
    return (b"meshwork route found v1" + lenb(f.get("origin", b"")) + lenb(f.get("target", b""))
            + struct.pack(">Q", f.get("query_id", 0)))


def pair_key(static_priv, me, peer_id):
    """protocol.md 10.3.1: K = SHA-256("meshwork pair key v1" || lo || hi || X25519(own, peer))."""
    shared = static_priv.exchange(X25519PublicKey.from_public_bytes(peer_id))
    lo, hi = sorted([me, peer_id])
    return hashlib.sha256(b"meshwork pair key v1" + lo + hi + shared).digest()


def routed_ad(r):
    return (b"meshwork routed v1" + lenb(r.get("origin", b"")) + lenb(r.get("target", b""))
            + struct.pack(">I", r.get("command", 0)) + struct.pack(">Q", r.get("request_id", 0))
            + struct.pack(">i", r.get("kind", 0)) + struct.pack(">Q", r.get("sent_at_ms", 0)))


def seal(k, r, plaintext):
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
    n = secrets.token_bytes(24)
    km = hmac.new(k, b"meshwork message key v1" + n[:16], hashlib.sha256).digest()
    return n + ChaCha20Poly1305(km).encrypt(b"\x00" * 4 + n[16:], plaintext, routed_ad(r))


def unseal(k, r):
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
    payload = r.get("payload", b"")
    n = payload[:24]
    km = hmac.new(k, b"meshwork message key v1" + n[:16], hashlib.sha256).digest()
    return ChaCha20Poly1305(km).decrypt(b"\x00" * 4 + n[16:], payload[24:], routed_ad(r))


# --------------------------------------------------------------------------
# Connection: preamble, security stage, framing.

MAGIC = b"mshwrk"
KIND_REQUEST, KIND_REPLY, KIND_ERROR = 1, 2, 3
REASONS = {1: "SHUTDOWN", 2: "TOO_MANY_PEERS", 3: "PROTOCOL_ERROR", 4: "DUPLICATE_CONNECTION", 5: "BANNED",
           6: "OTHER", 7: "WRONG_NETWORK", 8: "INCOMPATIBLE_VERSION", 9: "SELF_CONNECTION", 10: "TIMEOUT",
           11: "NOT_ALLOWED", 12: "INCOMPATIBLE_SETTINGS"}
CMD_ECHO, CMD_FLOOD, CMD_ROUTING, CMD_TOPICS = 0x100, 0xFFFF0001, 0xFFFF0002, 0xFFFF0003
CMD_SYNC, CMD_RPC = 0xFFFF0100, 0xFFFF0200
MAX_FRAME = 16 * 1024 * 1024


class Closed(Exception):
    pass


class Conn:
    def __init__(self, sock, initiator, noise, static_priv, psk):
        self.sock = sock
        self.initiator = initiator
        self.noise = noise
        self.static_priv = static_priv
        self.psk = psk
        self.raw = bytearray()    # bytes read from the socket, not yet used
        self.plain = bytearray()  # frame stream bytes (decrypted)
        self.send_cs = self.recv_cs = None
        self.peer_static = None
        self.eof = False

    def _fill(self, timeout):
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            return False
        if not data:
            self.eof = True
            raise Closed("end of stream")
        self.raw += data
        return True

    def read_raw(self, n, timeout=10.0):
        deadline = time.time() + timeout
        while len(self.raw) < n:
            left = deadline - time.time()
            if left <= 0 or not self._fill(left):
                raise TimeoutError("timed out reading %d bytes" % n)
        out = bytes(self.raw[:n])
        del self.raw[:n]
        return out

    def preamble(self):
        mode = b"\x01" if self.noise else b"\x00"
        self.sock.sendall(MAGIC + b"\x01" + mode)
        got = self.read_raw(8)
        if got[:6] != MAGIC or got[6] != 1 or got[7:8] != mode:
            raise Closed("bad preamble %s" % got.hex())
        return got

    def noise_handshake(self, prologue):
        hs = NoiseXXpsk0(self.initiator, self.static_priv, prologue, self.psk)

        def send(m):
            self.sock.sendall(struct.pack(">H", len(m)) + m)

        def recv():
            n = struct.unpack(">H", self.read_raw(2))[0]
            return self.read_raw(n)

        if self.initiator:
            send(hs.write1())
            m2 = recv()
            assert len(m2) == 96, len(m2)
            hs.read2(m2)
            send(hs.write3())
        else:
            hs.read1(recv())
            send(hs.write2())
            hs.read3(recv())
        self.peer_static = hs.rs
        self.send_cs, self.recv_cs = hs.split()

    # the frame stream
    def _more_plain(self, timeout):
        if not self.noise:
            if self.raw:
                self.plain += self.raw
                self.raw.clear()
                return True
            if not self._fill(timeout):
                return False
            self.plain += self.raw
            self.raw.clear()
            return True
        deadline = time.time() + timeout
        while len(self.raw) < 2:
            if not self._fill(max(0.0, deadline - time.time())):
                return False
        n = struct.unpack_from(">H", self.raw)[0]
        if n < 16:
            raise Closed("transport message shorter than its tag")
        while len(self.raw) < 2 + n:
            left = deadline - time.time()
            if not self._fill(max(left, 1.0)):  # a message once started is read whole
                raise TimeoutError("stalled inside a transport message")
        ct = bytes(self.raw[2:2 + n])
        del self.raw[:2 + n]
        self.plain += self.recv_cs.decrypt(b"", ct)
        return True

    def send_bytes(self, data):
        if not self.noise:
            self.sock.sendall(data)
            return
        out = bytearray()
        for i in range(0, len(data), 65519):
            ct = self.send_cs.encrypt(b"", data[i:i + 65519])
            out += struct.pack(">H", len(ct)) + ct
        self.sock.sendall(out)

    def send(self, env):
        body = encode(ENVELOPE, env)
        assert 0 < len(body) <= MAX_FRAME
        log(">>", summarize(env))
        self.send_bytes(struct.pack(">I", len(body)) + body)

    def recv(self, timeout):
        """One decoded Envelope, or None on timeout. Raises Closed at end of stream."""
        deadline = time.time() + timeout
        while True:
            if len(self.plain) >= 4:
                n = struct.unpack_from(">I", self.plain)[0]
                if n == 0 or n > MAX_FRAME:
                    raise Closed("invalid frame length %d" % n)
                if len(self.plain) >= 4 + n:
                    body = bytes(self.plain[4:4 + n])
                    del self.plain[:4 + n]
                    env = decode(ENVELOPE, body)
                    if not env:
                        raise Closed("envelope without a body")
                    log("<<", summarize(env))
                    return env
            left = deadline - time.time()
            if left <= 0:
                return None
            try:
                got = self._more_plain(left)
            except Closed:
                if self.plain:
                    raise Closed("end of stream inside a frame")
                raise
            if not got:
                return None


def summarize(env):
    name, m = body_of(env)
    if name == "concern":
        return "concern cmd=%#x id=%d kind=%d flags=%d payload=%dB" % (
            m.get("command", 0), m.get("request_id", 0), m.get("kind", 0), m.get("flags", 0),
            len(m.get("payload", b"")))
    if name == "hello":
        m = dict(m, node_id=m.get("node_id", b"").hex())
    if name == "discovered":
        return "discovered %d peers" % len(m.get("peers", []))
    return "%s %s" % (name, m)


# --------------------------------------------------------------------------
# The sync replica (protocol.md 11): enough to answer a node's anti-entropy.

def fnv1a64(data):
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def bucket_of(key):
    return fnv1a64(key) >> 56


class Entry:
    """A resolved entry: absolute claim, lease_until, expires_at; writer filled in."""

    def __init__(self, key, value, stamp, writer, epoch=0, claim=None, lease_until=0, expires_at=0,
                 ttl_ms=0, no_lease=False):
        self.key, self.value, self.stamp, self.writer = key, value, stamp, writer
        self.epoch = epoch
        self.claim = stamp if claim is None else claim
        self.lease_until, self.expires_at, self.ttl_ms, self.no_lease = lease_until, expires_at, ttl_ms, no_lease

    @staticmethod
    def from_wire(m, sender):
        stamp = m.get("stamp", 0)
        millis = stamp >> 16
        no_lease = m.get("no_lease", False)
        ttl = m.get("ttl_ms", 0)
        return Entry(m.get("key", b""), None if m.get("deleted") else m.get("value", b""), stamp,
                     m.get("writer", b"") or sender, m.get("epoch", 0), stamp - m.get("claim_delta", 0),
                     0 if no_lease else millis + m.get("lease_delta", 0),
                     millis + m.get("expires_delta", 0) if ttl else 0, ttl, no_lease)

    def to_wire(self, me):
        millis = self.stamp >> 16
        m = {"key": self.key, "stamp": self.stamp, "epoch": self.epoch, "claim_delta": self.stamp - self.claim,
             "ttl_ms": self.ttl_ms, "no_lease": self.no_lease}
        if self.value is None:
            m["deleted"] = True
        else:
            m["value"] = self.value
        if self.writer != me:
            m["writer"] = self.writer
        if not self.no_lease:
            m["lease_delta"] = self.lease_until - millis
        if self.ttl_ms:
            m["expires_delta"] = self.expires_at - millis
        return m

    def hash(self):
        d = struct.pack(">Q", len(self.key)) + self.key
        d += b"\x00" if self.value is None else b"\x01" + struct.pack(">Q", len(self.value)) + self.value
        d += struct.pack(">Q", self.stamp) + struct.pack(">Q", len(self.writer)) + self.writer
        for x in (self.epoch, self.claim, self.lease_until, self.expires_at, self.ttl_ms):
            d += struct.pack(">Q", x & 0xFFFFFFFFFFFFFFFF)
        return int.from_bytes(hashlib.sha256(d).digest()[:8], "big")

    def rank(self, leasing=True):
        """sync.md "Which entry wins": the greater rank wins. Leasing on: higher epoch, earlier
        claim, smaller writer, later stamp; leasing off: later stamp, larger writer. Then the
        tie-breaks: a tombstone, the value (absent first, then bytewise), lease_until,
        expires_at, ttl_ms, epoch, claim, writer."""
        if leasing:
            primary = (self.epoch, -self.claim, [-b for b in self.writer] + [1], self.stamp)
        else:
            primary = (self.stamp, list(self.writer))
        value = (0, b"") if self.value is None else (1, self.value)
        return primary + (self.value is None, value, self.lease_until, self.expires_at, self.ttl_ms,
                          self.epoch, self.claim, list(self.writer))


class Replica:
    def __init__(self, leasing=True):
        self.entries = {}
        self.leasing = leasing

    def merge(self, e):
        old = self.entries.get(e.key)
        if old is None or e.rank(self.leasing) > old.rank(self.leasing):
            self.entries[e.key] = e
            return True
        return False

    def buckets(self):
        b = [0] * 256
        for e in self.entries.values():
            b[bucket_of(e.key)] ^= e.hash()
        return b

    def root(self):
        r = 0
        for x in self.buckets():
            r ^= x
        return r

    def chunk(self, buckets, after_bucket=None, after_key=None):
        out = []
        for b in buckets:
            keys = sorted(k for k in self.entries if bucket_of(k) == b)
            for k in keys:
                if after_bucket is not None and (b < after_bucket or (b == after_bucket and k <= after_key)):
                    continue
                out.append(self.entries[k])
        return out


# --------------------------------------------------------------------------
# The peer.

class Peer:
    def __init__(self, conn, me, network, replica, secret32, listen_addrs=()):
        self.conn = conn
        self.listen_addrs = list(listen_addrs)
        self.me = me
        self.network = network
        self.peer_id = None
        self.replica = replica
        self.secret32 = secret32
        self.inbox = []          # established-state frames not yet consumed
        self.pongs = {}
        self.pong_counts = []    # the peer_count of each Pong from the node (None if absent)
        self.pings_answered = 0
        self.sync_requests = {}  # body name -> count of node requests we answered
        self.floods = []
        self.routes = []
        self.discovered = []
        self.disconnect = None

    def hello(self):
        return {"hello": {"protocol_version": 1, "network_id": self.network, "node_id": self.me,
                          "listen_addrs": self.listen_addrs, "capabilities": 0,
                          # 4.2: our count of peers (none yet) and how many we want (the node).
                          "peer_count": {"linked": 0, "min_peers": 1},
                          "metadata": {"meshwork.sync.leasing": "on" if self.replica.leasing else "off",
                                       "meshwork.sync.max_clock_skew_ms": "60000",
                                       "role": "pypeer"}}}

    def handshake(self):
        c = self.conn
        if c.initiator:
            c.send(self.hello())
        env = c.recv(10)
        if env is None:
            raise Closed("no Hello from the node within 10 s")
        name, m = body_of(env)
        if name == "disconnect":
            self.disconnect = m
            raise Closed("refused: %s %r" % (REASONS.get(m.get("reason")), m.get("message")))
        if name != "hello":
            raise Closed("first frame is %s" % name)
        if m.get("network_id", "") != self.network or m.get("protocol_version", 0) != 1:
            raise Closed("bad hello %r" % m)
        if c.noise and m.get("node_id") != c.peer_static:
            raise Closed("node id is not the authenticated key")
        self.peer_id = m.get("node_id")
        self.peer_hello = m
        if not c.initiator:
            c.send(self.hello())

    def pump(self, timeout):
        """Read one frame and handle what the protocol handles by itself; return it."""
        env = self.conn.recv(timeout)
        if env is None:
            return None
        name, m = body_of(env)
        if name == "ping":
            # 4.3: our count of peers now (the node), as in our Hello.
            self.conn.send({"pong": {"nonce": m.get("nonce", 0), "timestamp_micros": now_us(),
                                     "peer_count": {"linked": 1, "min_peers": 1}}})
            self.pings_answered += 1
            return env
        if name == "pong":
            self.pongs[m.get("nonce", 0)] = time.time()
            self.pong_counts.append(m.get("peer_count"))
            return env
        if name == "disconnect":
            self.disconnect = m
            raise Closed("node sent Disconnect %s %r" % (REASONS.get(m.get("reason")), m.get("message")))
        if name == "hello":
            raise Closed("Hello after the handshake")
        if name == "discovered":
            self.discovered.append(m)
            return env
        if name == "concern":
            if self.serve_concern(m):
                return env
        self.inbox.append(env)
        return env

    def wait(self, pred, timeout):
        """Pump until a frame in the inbox satisfies pred; remove and return it."""
        deadline = time.time() + timeout
        while True:
            for i, env in enumerate(self.inbox):
                if pred(env):
                    return self.inbox.pop(i)
            left = deadline - time.time()
            if left <= 0:
                return None
            self.pump(left)

    def request(self, command, payload, timeout=5.0, flags=0):
        rid = secrets.randbits(64) or 1
        self.conn.send({"concern": {"command": command, "request_id": rid, "kind": KIND_REQUEST,
                                    "flags": flags, "payload": payload}})
        env = self.wait(lambda e: "concern" in e and e["concern"].get("request_id") == rid
                        and e["concern"].get("command", 0) == command
                        and e["concern"].get("kind") in (KIND_REPLY, KIND_ERROR), timeout)
        return None if env is None else env["concern"]

    def one_way(self, command, payload, flags=0):
        self.conn.send({"concern": {"command": command, "request_id": 0, "kind": KIND_REQUEST,
                                    "flags": flags, "payload": payload}})

    def reply(self, req, payload, kind=KIND_REPLY):
        self.conn.send({"concern": {"command": req.get("command", 0), "request_id": req["request_id"],
                                    "kind": kind, "flags": req.get("flags", 0) & 3, "payload": payload}})

    def serve_concern(self, m):
        """Handle requests the node makes of us. True if consumed."""
        if m.get("kind") != KIND_REQUEST:
            return False
        cmd = m.get("command", 0)
        rid = m.get("request_id", 0)
        if cmd == CMD_FLOOD:
            f = decode(FLOODED, m.get("payload", b""))
            self.floods.append(f)
            return True
        if cmd == CMD_SYNC:
            self.serve_sync(m)
            return True
        if cmd == CMD_ROUTING:
            name, body = body_of(decode(ROUTE, m.get("payload", b"")))
            if name in ("found", "routed", "not_found"):
                self.routes.append((name, body))
            return True  # route queries: we are a leaf and stay silent (allowed; searches time out)
        if rid:
            self.reply(m, encode(CONCERN_ERROR, {"code": 1, "message": "pypeer: unknown command"}), KIND_ERROR)
        return True

    def serve_sync(self, m):
        name, body = body_of(decode(SYNC, m.get("payload", b"")))
        self.sync_requests[name] = self.sync_requests.get(name, 0) + 1
        rid = m.get("request_id", 0)
        sender = self.peer_id
        if name == "push":
            origin = body.get("origin", b"") or sender
            for e in body.get("entries", []):
                self.replica.merge(Entry.from_wire(e, origin))
            return
        if name == "entries":
            applied = sum(self.replica.merge(Entry.from_wire(e, sender)) for e in body.get("entries", []))
            if rid:
                self.reply(m, encode(SYNC, {"ack": {"applied": applied}}))
            return
        if name == "digest":
            root = self.replica.root()
            if body.get("root", 0) == root:
                ans = {"equal": True, "entries": len(self.replica.entries)}
            else:
                ans = {"buckets": self.replica.buckets(), "entries": len(self.replica.entries)}
            self.reply(m, encode(SYNC, {"answer": ans}))
            return
        if name == "pull":
            resume = body.get("resume", False)
            es = self.replica.chunk(body.get("buckets", []), body.get("after_bucket", 0) if resume else None,
                                    body.get("after_key", b"") if resume else None)
            self.reply(m, encode(SYNC, {"chunk": {"entries": [e.to_wire(self.me) for e in es]}}))
            return
        if name in ("prune", "graft"):
            return
        if rid:
            self.reply(m, encode(CONCERN_ERROR, {"code": 2, "message": "pypeer: unexpected sync body"}), KIND_ERROR)

    def sync_request(self, body_name, body, timeout=5.0):
        r = self.request(CMD_SYNC, encode(SYNC, {body_name: body}), timeout, flags=2 if body_name == "pull" else 0)
        if r is None or r.get("kind") != KIND_REPLY:
            return r, None
        return r, body_of(decode(SYNC, r.get("payload", b"")))

    def pull_all(self):
        """One anti-entropy round as the asker: DigestQuery, Pull the differing buckets, merge."""
        r, (name, ans) = self.sync_request("digest", {"root": self.replica.root()})
        if name != "answer":
            raise RuntimeError("DigestQuery answered with %s" % name)
        if ans.get("equal"):
            return 0, True
        mine = self.replica.buckets()
        theirs = ans.get("buckets", [])
        if len(theirs) != 256:
            raise RuntimeError("DigestAnswer carries %d bucket hashes" % len(theirs))
        diff = [i for i in range(256) if mine[i] != theirs[i]]
        got, pull = 0, {"buckets": diff}
        for _ in range(1024):
            r, (name, ch) = self.sync_request("pull", pull)
            if name != "chunk":
                raise RuntimeError("Pull answered with %s" % name)
            for e in ch.get("entries", []):
                got += self.replica.merge(Entry.from_wire(e, self.peer_id))
            if not ch.get("more"):
                break
            pull = {"buckets": diff, "resume": True, "after_bucket": ch.get("next_bucket", 0),
                    "after_key": ch.get("next_key", b"")}
        return got, False

    def goodbye(self, reason=1, message="pypeer done"):
        self.conn.send({"disconnect": {"reason": reason, "message": message}})
        self.conn.sock.shutdown(socket.SHUT_WR)
        deadline = time.time() + 5
        while time.time() < deadline:
            try:
                env = self.conn.recv(deadline - time.time())
            except Closed:
                return True  # the node closed its side: clean
            if env is not None:
                log("after our Disconnect:", summarize(env))
        return False


def now_us():
    return int(time.time() * 1e6)


def now_ms():
    return int(time.time() * 1000)


# --------------------------------------------------------------------------
# The checks.

class Report:
    def __init__(self):
        self.failed = 0
        self.passed = 0

    def check(self, what, ok, detail=""):
        if ok:
            self.passed += 1
        else:
            self.failed += 1
        print("%-4s %s%s" % ("ok" if ok else "FAIL", what, (": " + str(detail)) if detail else ""), flush=True)
        return ok

    def info(self, what, detail):
        print("info %s: %s" % (what, detail), flush=True)


def admin(addr, method, path, data=None):
    req = urllib.request.Request("http://%s%s" % (addr, path), data=data, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def connect(args, static_priv, me, replica, secret32, sock=None, initiator=True):
    conn = open_conn(args, static_priv, initiator, sock)
    peer = Peer(conn, me, args.network, replica, secret32,
                ["tcp://" + args.listen] if args.listen and not initiator else [])
    peer.handshake()
    return peer


def open_conn(args, static_priv, initiator=True, sock=None):
    """A connection up to the frame stream (preamble and, in Noise mode, the
    Noise handshake): a new one to `args.node`, or `sock` (accepted)."""
    if sock is None:
        host, port = args.node.rsplit(":", 1)
        sock = socket.create_connection((host, int(port)), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    psk = noise_psk(network_secret(args.network_key) if args.network_key else None) if not args.insecure else None
    conn = Conn(sock, initiator, not args.insecure, static_priv, psk)
    pre = conn.preamble()
    if not args.insecure:
        conn.noise_handshake(pre)
    return conn


def expect_close(conn, timeout=5.0):
    """Read until the node's Disconnect or end of stream. Returns (reason name, message),
    ('eof', frames before it) or ('open', frames) if the node neither."""
    frames = []
    deadline = time.time() + timeout
    try:
        while time.time() < deadline:
            env = conn.recv(deadline - time.time())
            if env is None:
                break
            name, m = body_of(env)
            if name == "disconnect":
                return REASONS.get(m.get("reason"), m.get("reason")), m.get("message", "")
            frames.append(name)
    except Closed as e:
        return "eof", "%s after %s" % (e, frames)
    except OSError as e:
        return "eof", "%s after %s" % (e, frames)
    return "open", frames


def run(args):
    rep = Report()
    if not args.insecure and not HAVE_CRYPTO:
        print("the cryptography package is missing: only --insecure (plaintext) works")
        return 2
    secret32 = bytearray(secrets.token_bytes(32))
    secret32[0] &= 248
    secret32[31] = (secret32[31] & 127) | 64
    secret32 = bytes(secret32)
    if HAVE_CRYPTO:
        static_priv = X25519PrivateKey.from_private_bytes(secret32)
        me = x25519_pub(static_priv)
    else:
        static_priv = None
        me = secrets.token_bytes(32)  # plaintext mode: an opaque id (our floods then cannot be signed)
    print("pypeer node id %s, %s mode" % (me.hex(), "plaintext" if args.insecure else "Noise"))
    # The PSK test vectors of protocol.md 5.1.2.
    rep.check("PSK test vectors (5.1.2)",
              noise_psk().hex() == "e5090521677a45667e42a76c0db2be134f6b324e4ec0d54971d49f77e563bc2e"
              and noise_psk(b"0123456789abcdef").hex()
              == "79a6c6940352f2b4cda96620fbf7bb6f68bc34b5bd484559699861e65cbfbebf")
    rep.check("worked example frames (3.1)",
              encode(ENVELOPE, {"hello": {"protocol_version": 1, "network_id": "demo", "node_id": b"\x01\x02\x03"}})
              == bytes.fromhex("0a0d0801120464656d6f1a03010203")
              and encode(ENVELOPE, {"disconnect": {"reason": 1}}) == bytes.fromhex("2a020801")
              and encode(ENVELOPE, {"ping": {}}) == bytes.fromhex("1200"))

    replica = Replica(leasing=not args.no_leasing)
    try:
        if args.listen:
            sock = accept_one(args)
            peer = connect(args, static_priv, me, replica, secret32, sock=sock, initiator=False)
        else:
            peer = connect(args, static_priv, me, replica, secret32)
    except (Closed, OSError, TimeoutError) as e:
        rep.check("connect, preamble, security stage, Hello", False, e)
        return 1
    rep.check("%s, preamble, %s, Hello exchange as %s" % (
        "accepted the node's dial" if args.listen else "connected",
        "plaintext" if args.insecure else "Noise XXpsk0", "responder" if args.listen else "initiator"),
        True, "node %s, addrs %s, metadata %s" % (peer.peer_id.hex()[:16], peer.peer_hello.get("listen_addrs"),
                                                   peer.peer_hello.get("metadata")))
    try:
        checks(args, peer, rep, me, replica, secret32)
    except (Closed, OSError, TimeoutError) as e:
        rep.check("connection stayed up", False, e)
    if args.negative and not args.listen:
        negative_checks(args, static_priv, me, secret32, rep)
    print("%d passed, %d failed" % (rep.passed, rep.failed))
    return 0 if rep.failed == 0 else 1


def accept_one(args):
    """Listen; a node told to --seed our address dials us, and we are the responder."""
    host, port = args.listen.rsplit(":", 1)
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((host, int(port)))
    ls.listen(4)
    ls.settimeout(args.listen_wait)
    print("listening on %s for a node to dial us (%.0f s)" % (args.listen, args.listen_wait), flush=True)
    try:
        sock, _ = ls.accept()
    finally:
        ls.close()
    return sock


def checks(args, peer, rep, me, replica, secret32):
    # Pings: ours, answered with our nonce.
    nonces = [secrets.randbits(64) for _ in range(3)] + [0]
    for n in nonces:
        peer.conn.send({"ping": {"nonce": n, "timestamp_micros": now_us()}})
    deadline = time.time() + 5
    while time.time() < deadline and not all(n in peer.pongs for n in nonces):
        peer.pump(deadline - time.time())
    rep.check("Pings answered with Pongs of the same nonce (nonce 0 too)", all(n in peer.pongs for n in nonces))
    # The node's count of its peers (4.2, 4.3): in its Hello and in every Pong, wanting at
    # least one peer (min_peers); `linked` is whatever it has (absent fields read as 0).
    counts = [peer.peer_hello.get("peer_count")] + peer.pong_counts
    rep.check("the node's Hello and Pongs carry its peer count (linked, min_peers >= 1)",
              all(c is not None and c.get("min_peers", 0) >= 1 for c in counts),
              [c.get("linked", 0) if c is not None else None for c in counts])

    # The node's heartbeats (every 2 s when nothing arrives) and its Discovered.
    deadline = time.time() + 6
    while time.time() < deadline and (peer.pings_answered == 0 or (args.expect_discovered and not peer.discovered)):
        peer.pump(deadline - time.time())
    # Not required: the node pings only a peer silent for its heartbeat interval (9.4), and our
    # answers to its anti-entropy rounds may keep us from ever being silent that long.
    rep.info("the node's heartbeat Pings answered", peer.pings_answered)
    if args.expect_discovered:
        rep.check("received a Discovered", bool(peer.discovered) and bool(peer.discovered[0].get("peers")),
                  [(p.get("node_id", b"").hex()[:16], p.get("addrs"), p.get("age_ms")) for d in peer.discovered
                   for p in d.get("peers", [])])
        n = len(peer.discovered)
        peer.conn.send({"discovered": {}})  # an ask (4.4)
        deadline = time.time() + 3
        while time.time() < deadline and len(peer.discovered) == n:
            peer.pump(deadline - time.time())
        rep.check("an empty Discovered (an ask) is answered with a non-empty one",
                  len(peer.discovered) > n and bool(peer.discovered[-1].get("peers")))

    # Echo concern, command 0x100.
    r = peer.request(CMD_ECHO, b"hello from python")
    rep.check("echo concern (0x100) answers REPLY with our bytes",
              r is not None and r.get("kind") == KIND_REPLY and r.get("payload") == b"hello from python", r)
    r = peer.request(0x4242, b"x")
    err = decode(CONCERN_ERROR, r.get("payload", b"")) if r else None
    rep.check("unknown command answered ERROR / UNKNOWN_COMMAND", r is not None and r.get("kind") == KIND_ERROR
              and err.get("code") == 1, err)
    r = peer.request(CMD_ECHO, b"on the control lane", flags=1)
    rep.check("a request on the control lane (flags=1) is answered with flags=1",
              r is not None and r.get("flags", 0) & 3 == 1, r and r.get("flags", 0))

    # Broadcast by the node, received as a signed flood.
    if args.admin:
        marker = ("pypeer broadcast %d" % secrets.randbits(32)).encode()
        st, body = admin(args.admin, "POST", "/broadcast", marker)
        rep.check("POST /broadcast accepted", st == 200, (st, body))
        deadline = time.time() + 5
        # The CLI's echo concern tags its payloads (README, "Messages across the mesh"):
        # 0xFE + message for a broadcast, 0xFF + message for a request wanting an answer.
        while time.time() < deadline and not any(f.get("payload") == b"\xfe" + marker for f in peer.floods):
            peer.pump(deadline - time.time())
        fl = [f for f in peer.floods if f.get("payload") == b"\xfe" + marker]
        rep.check("the broadcast arrives as a Flooded frame (command 0xFFFF0001) for the echo concern",
                  bool(fl) and fl[0].get("command") == CMD_ECHO and fl[0].get("origin") == peer.peer_id,
                  fl and {k: (v.hex()[:16] if isinstance(v, bytes) else v) for k, v in fl[0].items()})
        if fl:
            f = fl[0]
            rep.check("its ttl is >= 1 and its stamp near our clock",
                      f.get("ttl", 0) >= 1 and abs(f.get("sent_at_ms", 0) - now_ms()) < 60000)
            rep.check("its XEdDSA signature checks as Ed25519 under the origin's Edwards key (10.2)",
                      xeddsa_verify(f.get("origin", b""), flood_signed_bytes(f), f.get("signature", b"")))
            bad = dict(f, payload=f.get("payload", b"") + b"!")
            rep.check("an altered flood does not check", not xeddsa_verify(bad["origin"], flood_signed_bytes(bad),
                                                                           bad.get("signature", b"")))
        # A flood of our own, signed here with XEdDSA: the node delivers it to its echo concern.
        if HAVE_CRYPTO:
            mine = ("pypeer flood %d" % secrets.randbits(32)).encode()
            f = {"origin": me, "message_id": secrets.randbits(64), "command": CMD_ECHO, "payload": mine,
                 "ttl": 4, "sent_at_ms": now_ms()}
            f["signature"] = xeddsa_sign(secret32, flood_signed_bytes(f))
            rep.check("our XEdDSA signature checks locally", xeddsa_verify(me, flood_signed_bytes(f), f["signature"]))
            peer.one_way(CMD_FLOOD, encode(FLOODED, f))
            found = False
            deadline = time.time() + 5
            while time.time() < deadline and not found:
                peer.pump(0.3)
                st, body = admin(args.admin, "GET", "/events")
                found = mine in body or mine.hex().encode() in body
            rep.check("a flood signed by us is delivered by the node (its /events)", found)

        # A topic publication: a flood for command 0xFFFF0003 carrying Published (10.4).
        st, body = admin(args.admin, "POST", "/publish/pypeer-news", b"extra extra")
        deadline = time.time() + 5
        pubs = []
        while time.time() < deadline and not pubs:
            peer.pump(0.3)
            pubs = [decode(PUBLISHED, f.get("payload", b"")) for f in peer.floods if f.get("command") == CMD_TOPICS]
        rep.check("POST /publish arrives as a flood for 0xFFFF0003 carrying Published{topic, payload}",
                  st == 200 and bool(pubs) and pubs[-1].get("topic") == "pypeer-news", (st, body, pubs))

    # Routing (10.3): a sealed request to the echo concern of a node that is not our neighbour.
    others = [p_.get("node_id") for d in peer.discovered for p_ in d.get("peers", [])
              if len(p_.get("node_id", b"")) == 32 and p_.get("node_id") not in (me, peer.peer_id)]
    if others and HAVE_CRYPTO:
        target = others[0]
        q = {"query_id": secrets.randbits(64), "origin": me, "target": target, "ttl": 16, "sent_at_ms": now_ms()}
        q["signature"] = xeddsa_sign(secret32, route_query_signed_bytes(q))
        peer.one_way(CMD_ROUTING, encode(ROUTE, {"query": q}))
        deadline = time.time() + 4
        found = None
        while time.time() < deadline and found is None:
            peer.pump(0.3)
            for name, b in peer.routes:
                if b.get("query_id") == q["query_id"]:
                    found = (name, b)
        rep.check("a signed RouteQuery is answered RouteFound by our neighbour", found and found[0] == "found",
                  found and {k: (v.hex()[:16] if isinstance(v, bytes) else v) for k, v in found[1].items()})
        if found and found[0] == "found":
            f = found[1]
            rep.check("RouteFound is signed by the target (XEdDSA over 'meshwork route found v1' ...), hops 1",
                      xeddsa_verify(target, route_found_signed_bytes(f), f.get("signature", b""))
                      and f.get("hops") == 1, f.get("hops"))
            k = pair_key(peer.conn.static_priv, me, target)
            rid = secrets.randbits(64)
            r = {"origin": me, "target": target, "command": CMD_ECHO, "request_id": rid, "kind": KIND_REQUEST,
                 "ttl": 16, "sent_at_ms": now_ms()}
            r["payload"] = seal(k, r, b"routed hello")
            peer.one_way(CMD_ROUTING, encode(ROUTE, {"routed": r}))
            deadline = time.time() + 4
            ans = None
            while time.time() < deadline and ans is None:
                peer.pump(0.3)
                for name, b in peer.routes:
                    if name == "routed" and b.get("request_id") == rid:
                        ans = b
            opened = None
            if ans is not None:
                try:
                    opened = unseal(k, ans)
                except Exception as e:  # InvalidTag
                    opened = "does not open: %r" % e
            rep.check("a sealed Routed request reaches the target's echo; the sealed reply opens",
                      ans is not None and ans.get("origin") == target and ans.get("kind") == KIND_REPLY
                      and opened == b"routed hello", opened)
    elif args.expect_discovered:
        rep.info("routing", "skipped: no second node known, or no cryptography package")

    # The replicated map.
    deadline = time.time() + 4
    while time.time() < deadline and "digest" not in peer.sync_requests:
        peer.pump(deadline - time.time())
    rep.check("the node runs an anti-entropy round with us (DigestQuery answered)",
              "digest" in peer.sync_requests, peer.sync_requests)
    if args.admin:
        key = ("pypeer/from-node-%d" % secrets.randbits(32)).encode()
        st, body = admin(args.admin, "PUT", "/kv/" + urlquote(key), b"written by the node")
        rep.check("admin PUT /kv", st == 200, (st, body))
        deadline = time.time() + 5
        while time.time() < deadline and key not in replica.entries:
            peer.pump(0.5)
        rep.check("the node's write reaches our replica (Push or its anti-entropy)", key in replica.entries,
                  peer.sync_requests)
    replica2 = peer.replica
    try:
        got, equal = peer.pull_all()
        rep.check("DigestQuery / Pull / Chunk round as the asker", True, "merged %d, equal %s" % (got, equal))
        r, (name, ans) = peer.sync_request("digest", {"root": replica2.root()})
        rep.check("our root equals the node's after the round (entry hash rule of 11.2)",
                  name == "answer" and ans.get("equal") is True,
                  "" if ans.get("equal") else diff_buckets(replica2, ans))
    except RuntimeError as e:
        rep.check("DigestQuery / Pull / Chunk round as the asker", False, e)
    if args.admin:
        # Write a key with a Push (one-way) and one with Entries (a confirm, answered with Ack).
        for how in ("push", "entries"):
            key = ("pypeer/%s-%d" % (how, secrets.randbits(32))).encode()
            ms = now_ms()
            stamp = ms << 16
            if replica.leasing:
                e = Entry(key, b"written by python", stamp, me, epoch=1, claim=stamp, lease_until=ms + 3600_000)
            else:  # sync.md "Leasing off": epoch 0, no lease, claim = stamp
                e = Entry(key, b"written by python", stamp, me, no_lease=True)
            if how == "push":
                peer.one_way(CMD_SYNC, encode(SYNC, {"push": {"id": secrets.randbits(64), "origin": me,
                                                              "entries": [e.to_wire(me)]}}))
            else:
                r, (name, ack) = peer.sync_request("entries", {"entries": [e.to_wire(me)]})
                rep.check("Entries (confirm) answered with Ack{applied: 1}", name == "ack" and ack.get("applied") == 1,
                          (name, ack))
            replica.merge(e)
            deadline = time.time() + 3
            st = None
            while time.time() < deadline:
                peer.pump(0.2)
                st, body = admin(args.admin, "GET", "/kv/" + urlquote(key))
                if st == 200:
                    break
            ok = st == 200 and json.loads(body).get("value") == "written by python"
            writer = json.loads(body).get("writer") if st == 200 else None
            rep.check("a key written with %s is on the node, writer = our id" % how,
                      ok and writer == me.hex(), (st, body[:200]))
        r, (name, ans) = peer.sync_request("digest", {"root": replica.root()})
        rep.check("roots still equal after our writes", name == "answer" and ans.get("equal") is True,
                  "" if ans.get("equal") else diff_buckets(replica, ans))

    # RPC: the demo service with the JSON codec.
    if args.rpc:
        def call(method, args_json, version=0):
            msg = {"call": {"call_id": secrets.randbits(64), "service": args.rpc, "method": method,
                            "args": json.dumps(args_json).encode(), "codec": 1, "budget_ms": 5000,
                            "version": version}}
            r = peer.request(CMD_RPC, encode(RPC, msg))
            if r is None or r.get("kind") != KIND_REPLY:
                return r, None
            return r, body_of(decode(RPC, r.get("payload", b"")))[1]

        r, out = call("echo", ["hi"])
        rep.check("rpc %s.echo([\"hi\"]) -> ok \"hi\"" % args.rpc, out is not None and out.get("ok") == b'"hi"',
                  out if out is not None else r)
        r, out = call("add", [5])
        rep.check("rpc add([5]) -> ok <number>", out is not None and "ok" in out and
                  isinstance(json.loads(out["ok"]), int), out if out is not None else r)
        r, out = call("fail", ["no"])
        rep.check("rpc fail([\"no\"]) -> app_error", out is not None and "app_error" in out,
                  out if out is not None else r)
        r, out = call("nope", [])
        rep.check("rpc unknown method -> failure UNKNOWN_METHOD (2)", out is not None and
                  out.get("failure", {}).get("code") == 2, out if out is not None else r)
        r, out = call("echo", ["hi"], version=99)
        rep.check("rpc version 99 -> failure VERSION_MISMATCH (3) with the served version",
                  out is not None and out.get("failure", {}).get("code") == 3, out if out is not None else r)
        r = peer.request(CMD_RPC, encode(RPC, {"call": {"call_id": 7, "service": "no-such-service",
                                                        "method": "x", "args": b"[]", "codec": 1}}))
        out = body_of(decode(RPC, r.get("payload", b"")))[1] if r and r.get("kind") == KIND_REPLY else r
        rep.check("rpc unknown service -> failure UNKNOWN_SERVICE (1)",
                  isinstance(out, dict) and out.get("failure", {}).get("code") == 1, out)
        # the registry entry of the service, in our replica
        regs = [k for k in replica.entries if k.startswith(b"rpc/services/%s/" % args.rpc.encode())]
        rep.check("the service's registry entry is in our replica", bool(regs), regs)
        if regs:
            e = replica.entries[regs[0]]
            rep.check("registry key names its writer, value is {version, methods}",
                      regs[0].endswith(e.writer.hex().encode()) and "methods" in json.loads(e.value or b"{}"),
                      e.value)

    # Graceful close.
    clean = peer.goodbye()
    rep.check("Disconnect(SHUTDOWN), write side shut, the node closes its side", clean)
    if args.admin:
        time.sleep(0.5)
        st, body = admin(args.admin, "GET", "/status")
        rep.check("the node no longer lists us as connected", st == 200 and me.hex() not in
                  connected_ids(body), "")


def connected_ids(body):
    try:
        st = json.loads(body)
    except ValueError:
        return ""
    return json.dumps([p for p in st.get("peers", []) if p.get("state") not in ("disconnected",)])


def diff_buckets(replica, ans):
    if ans.get("equal"):
        return ""
    mine = replica.buckets()
    theirs = ans.get("buckets", [])
    d = [i for i in range(min(256, len(theirs))) if mine[i] != theirs[i]]
    keys = [k for k in replica.entries if bucket_of(k) in d]
    return "differing buckets %s, our keys there %s, node holds %s entries, we %d" % (
        d[:8], keys[:4], ans.get("entries"), len(replica.entries))


def urlquote(key):
    import urllib.parse
    return urllib.parse.quote(key.decode(), safe="")


def new_identity():
    if HAVE_CRYPTO:
        k = X25519PrivateKey.generate()
        return k, x25519_pub(k)
    return None, secrets.token_bytes(32)


def negative_checks(args, static_priv, me, secret32, rep):
    """The node's refusals and its reaction to invalid frames (5.2, 5.3, 7)."""
    node_id = None
    base_meta = {"meshwork.sync.leasing": "off" if args.no_leasing else "on", "meshwork.sync.max_clock_skew_ms": "60000"}

    def hello(ident, **over):
        h = {"protocol_version": 1, "network_id": args.network, "node_id": ident, "metadata": dict(base_meta)}
        h.update(over)
        return {"hello": h}

    def established():
        k, ident = new_identity()
        conn = open_conn(args, k)
        conn.send(hello(ident))
        env = conn.recv(5)
        if not env or "hello" not in env:
            raise Closed("no Hello: %r" % env)
        return conn, env["hello"]["node_id"]

    def case(what, expect, setup):
        try:
            got = setup()
        except (Closed, OSError, TimeoutError) as e:
            got = ("error", str(e))
        rep.check("%s -> %s" % (what, expect), got[0] == expect, got)

    # Refusals in the handshake.
    def refusal(**over):
        k, ident = new_identity()
        conn = open_conn(args, k)
        conn.send(hello(over.pop("node_id", ident), **over))
        return expect_close(conn)

    case("Hello of another network", "WRONG_NETWORK", lambda: refusal(network_id=args.network + "-other"))
    case("Hello of protocol version 2", "INCOMPATIBLE_VERSION", lambda: refusal(protocol_version=2))
    case("Hello without the sync metadata", "INCOMPATIBLE_SETTINGS", lambda: refusal(metadata={}))
    case("Hello with the other leasing mode", "INCOMPATIBLE_SETTINGS",
         lambda: refusal(metadata=dict(base_meta, **{"meshwork.sync.leasing": "on" if args.no_leasing else "off"})))
    conn, node_id = established()
    conn.send({"disconnect": {"reason": 1}})
    conn.sock.close()
    case("Hello carrying the node's own id", "SELF_CONNECTION", lambda: refusal(node_id=node_id))
    if not args.insecure:
        case("Hello whose id is not our Noise static key", "PROTOCOL_ERROR",
             lambda: refusal(node_id=secrets.token_bytes(32)))
    case("Hello with an empty node id", "PROTOCOL_ERROR", lambda: refusal(node_id=b""))
    case("Hello with 17 listen addresses", "PROTOCOL_ERROR",
         lambda: refusal(listen_addrs=["tcp://127.0.0.1:%d" % (1000 + i) for i in range(17)]))

    def first_frame(env_or_bytes):
        k, ident = new_identity()
        conn = open_conn(args, k)
        if isinstance(env_or_bytes, bytes):
            conn.send_bytes(env_or_bytes)
        else:
            conn.send(env_or_bytes)
        return expect_close(conn)

    case("a Ping as the first frame", "PROTOCOL_ERROR", lambda: first_frame({"ping": {"nonce": 1}}))
    case("a handshake frame prefix over the Hello limit (200 000)", "PROTOCOL_ERROR",
         lambda: first_frame(struct.pack(">I", 200000)))

    # Invalid frames after the handshake.
    def after(data):
        conn, _ = established()
        conn.send_bytes(data)
        return expect_close(conn)

    def frame(body):
        return struct.pack(">I", len(body)) + body

    case("a second Hello", "PROTOCOL_ERROR",
         lambda: after(frame(encode(ENVELOPE, hello(secrets.token_bytes(32))))))
    case("a zero-length frame", "PROTOCOL_ERROR", lambda: after(struct.pack(">I", 0)))
    case("a frame prefix over 16 MiB", "PROTOCOL_ERROR", lambda: after(struct.pack(">I", MAX_FRAME + 1)))
    case("an envelope with only an unknown body field (7)", "PROTOCOL_ERROR",
         lambda: after(frame(b"\x3a\x00")))
    case("a Concern of kind 0", "PROTOCOL_ERROR",
         lambda: after(frame(encode(ENVELOPE, {"concern": {"command": CMD_ECHO, "request_id": 1}}))))
    case("a Concern of kind 4", "PROTOCOL_ERROR",
         lambda: after(frame(encode(ENVELOPE, {"concern": {"command": CMD_ECHO, "request_id": 1, "kind": 4}}))))
    case("a Disconnect of reason 0", "PROTOCOL_ERROR",
         lambda: after(frame(encode(ENVELOPE, {"disconnect": {"message": "x"}}))))
    case("a Disconnect of reason 13", "PROTOCOL_ERROR",
         lambda: after(frame(encode(ENVELOPE, {"disconnect": {"reason": 13}}))))
    case("malformed protobuf (length past the end)", "PROTOCOL_ERROR", lambda: after(frame(b"\x12\x05\x08")))
    case("invalid UTF-8 in Disconnect.message", "PROTOCOL_ERROR",
         lambda: after(frame(b"\x2a\x05\x08\x01\x12\x01\xff")))
    case("end of stream inside a frame", "PROTOCOL_ERROR", lambda: after_eof(established, b"\x00\x00\x00\x09\x12"))

    # Valid but unusual frames: two body fields (the last wins); unknown fields skipped.
    conn, _ = established()
    body = encode(ENVELOPE, {"pong": {"nonce": 5}}) + encode(ENVELOPE, {"ping": {"nonce": 6}})
    conn.send_bytes(frame(body))
    got = None
    deadline = time.time() + 3
    while time.time() < deadline:
        env = conn.recv(deadline - time.time())
        if env and "pong" in env:
            got = env["pong"].get("nonce", 0)
            break
    rep.check("an envelope with pong then ping: the ping wins and is answered", got == 6, got)
    # ping { nonce: 7, field 10 (unknown, varint): 1 }
    conn.send_bytes(frame(b"\x12\x04\x08\x07\x50\x01"))
    got = None
    deadline = time.time() + 3
    while time.time() < deadline:
        env = conn.recv(deadline - time.time())
        if env and "pong" in env:
            got = env["pong"].get("nonce", 0)
            break
    rep.check("a Ping with an unknown field (10) is answered", got == 7, got)
    conn.send({"disconnect": {"reason": 1}})
    conn.sock.close()

    # Preamble failures: the node closes without sending anything more.
    for what, pre in (("a wrong magic", b"mshwrx\x01"), ("version byte 2", b"mshwrk\x02"),
                      ("the other mode", b"mshwrk\x01")):
        mode = (b"\x01" if args.insecure else b"\x00") if what == "the other mode" else (
            b"\x00" if args.insecure else b"\x01")
        host, port = args.node.rsplit(":", 1)
        sock = socket.create_connection((host, int(port)), timeout=5)
        sock.sendall(pre + mode)
        data = b""
        try:
            while True:
                d = sock.recv(4096)
                if not d:
                    break
                data += d
        except OSError as e:
            data += b"<%s>" % str(e).encode()
        sock.close()
        rep.check("preamble with %s: node sends its preamble only, then closes" % what,
                  data[:6] == MAGIC and len(data) == 8, data.hex())


def after_eof(established, partial):
    conn, _ = established()
    conn.send_bytes(partial)
    conn.sock.shutdown(socket.SHUT_WR)
    return expect_close(conn)


def main():
    global VERBOSE
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--node", default="127.0.0.1:7000", help="the node's TCP listen address (host:port)")
    ap.add_argument("--admin", help="the node's admin address (host:port): broadcast, kv checks")
    ap.add_argument("--insecure", action="store_true", help="plaintext mode (the node needs --insecure too)")
    ap.add_argument("--network", default="meshwork", help="network id (the node's --network)")
    ap.add_argument("--network-key", help="the node's network key file (Noise mode)")
    ap.add_argument("--rpc", default="demo", help="demo service name ('' to skip RPC checks)")
    ap.add_argument("--expect-discovered", action="store_true",
                    help="the node knows another node: expect a Discovered and an answer to an ask")
    ap.add_argument("--listen", help="host:port to listen on instead of dialling: a node started with "
                    "--seed tcp://HOST:PORT dials us and the checks run with us as the responder")
    ap.add_argument("--listen-wait", type=float, default=20.0)
    ap.add_argument("--no-leasing", action="store_true", help="the node runs with --no-leasing")
    ap.add_argument("--negative", action="store_true",
                    help="also check the node's refusals (wrong network, settings, version, self, bad frames)")
    ap.add_argument("-v", action="store_true", help="print every frame")
    args = ap.parse_args()
    VERBOSE = args.v
    sys.exit(run(args))


if __name__ == "__main__":
    main()
