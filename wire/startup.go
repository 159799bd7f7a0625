package wire

import (
	"encoding/binary"
	"fmt"
	"io"

	"github.com/jackc/pgx/v5/pgproto3"
)

// Request codes a client may send in place of a protocol version in its first packet.
const (
	codeCancel  = 80877102
	codeSSL     = 80877103
	codeGSSEnc  = 80877104
	maxStartup  = 10000 // the server's MAX_STARTUP_PACKET_LENGTH
	protoMajor3 = 3
)

// SQLSTATEs pgfly itself sends.
const (
	codeProtocolViolation      = "08P01"
	codeConnectionFailure      = "08006"
	codeFeatureUnsupported     = "0A000"
	codeAdminShutdown          = "57P01"
	codeCannotConnectNow       = "57P03"
	codeTooManyConnections     = "53300"
	codeReadOnlyTransaction    = "25006"
	codeNotInPrerequisiteState = "55000"
)

// startupPacket is a client's first packet (or one of its first, after SSL negotiation).
type startupPacket struct {
	raw  []byte // the whole packet, length included, as it is forwarded
	code uint32 // protocol version or request code
}

// readStartup reads one length-prefixed startup packet from r. It reads exactly the packet,
// never beyond it, so that no byte meant for a TLS handshake is consumed.
func readStartup(r io.Reader) (startupPacket, error) {
	var head [8]byte
	if _, err := io.ReadFull(r, head[:4]); err != nil {
		return startupPacket{}, err
	}
	n := int(binary.BigEndian.Uint32(head[:4]))
	if n < 8 || n > maxStartup {
		return startupPacket{}, &protocolError{fmt.Sprintf("invalid length of startup packet: %d", n)}
	}
	raw := make([]byte, n)
	copy(raw, head[:4])
	if _, err := io.ReadFull(r, raw[4:]); err != nil {
		return startupPacket{}, unexpected(err)
	}
	return startupPacket{raw: raw, code: binary.BigEndian.Uint32(raw[4:8])}, nil
}

// startupParams parses the name/value pairs of a StartupMessage.
func startupParams(raw []byte) (map[string]string, error) {
	params := make(map[string]string)
	b := raw[8:]
	for len(b) > 0 && b[0] != 0 {
		name, rest, ok := cstring(b)
		if !ok {
			return nil, &protocolError{"invalid startup packet layout: expected terminator as last byte"}
		}
		value, rest, ok := cstring(rest)
		if !ok {
			return nil, &protocolError{fmt.Sprintf("invalid startup packet layout: no value for %q", name)}
		}
		params[name] = value
		b = rest
	}
	if len(b) != 1 {
		return nil, &protocolError{"invalid startup packet layout: expected terminator as last byte"}
	}
	if params["user"] == "" {
		return nil, &protocolError{"no PostgreSQL user name specified in startup packet"}
	}
	return params, nil
}

// withParam returns a copy of raw, a StartupMessage that startupParams accepted, with the
// run-time parameter name set to value: replaced where the client set it, else added.
func withParam(raw []byte, name, value string) []byte {
	out := make([]byte, 8, len(raw)+len(name)+len(value)+2)
	copy(out, raw[:8])
	b := raw[8:]
	for len(b) > 0 && b[0] != 0 {
		k, rest, _ := cbytes(b)
		v, rest, _ := cbytes(rest)
		b = rest
		if string(k) == name {
			continue
		}
		out = append(append(append(append(out, k...), 0), v...), 0)
	}
	out = append(append(append(append(out, name...), 0), value...), 0, 0)
	binary.BigEndian.PutUint32(out[0:4], uint32(len(out)))
	return out
}

func cstring(b []byte) (s string, rest []byte, ok bool) {
	v, rest, ok := cbytes(b)
	return string(v), rest, ok
}

// errorMessage encodes an ErrorResponse from pgfly itself.
func errorMessage(severity, code, msg string) []byte {
	e := pgproto3.ErrorResponse{
		Severity:            severity,
		SeverityUnlocalized: severity,
		Code:                code,
		Message:             msg,
	}
	b, err := e.Encode(nil)
	if err != nil { // only for a message over 1 GiB
		panic(err)
	}
	return b
}
