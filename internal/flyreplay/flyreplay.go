// Package flyreplay reads and writes the two headers of Fly's replay protocol:
// fly-replay, with which an app's response asks Fly's proxy to send the same
// request elsewhere, and fly-replay-src, which the proxy adds to the replayed
// request. Both are lists of key=value fields separated by ';', where a value
// may be a quoted string with backslash escapes.
//
// It is grammar only: it never decides where a request goes, never checks
// that a region or instance exists, and does no I/O.
package flyreplay

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"
)

// Header names, in canonical form.
const (
	Header    = "Fly-Replay"
	SrcHeader = "Fly-Replay-Src"
)

// Field is a field this package does not know. Parse keeps such fields, in
// order and with their keys lowercased, so that String writes them back.
type Field struct {
	Key, Value string
}

// Replay is a fly-replay response header.
type Replay struct {
	// Region lists the regions to replay in, in order of preference (region=;
	// "any" and aliases such as "eu" are Fly's and pass through unchanged).
	// A region name cannot contain a comma.
	Region []string
	// Instance is the machine to replay on (instance=).
	Instance string
	// PreferInstance is the machine to replay on if possible (prefer_instance=).
	PreferInstance string
	// App is the app to replay to (app=).
	App string
	// State is free text the proxy echoes back in fly-replay-src (state=).
	State string
	// Elsewhere excludes the answering machine from the next load-balancing
	// round (elsewhere=true).
	Elsewhere bool
	// Timeout is how long the proxy tries the replay, as written, e.g. "10s"
	// or "800ms" (timeout=). It is not interpreted.
	Timeout string
	// Fallback is what the proxy does when the replay fails, "force_self" or
	// "prefer_self" (fallback=). It is not checked.
	Fallback string
	// Extra holds fields this package does not know. String writes them after
	// the known ones; an Extra key that is also a known one makes a header
	// that Parse rejects.
	Extra []Field
}

// Parse reads a fly-replay header value. Keys are case-insensitive, white
// space around fields and values is ignored, and empty fields are skipped. A
// region list may be unquoted (region=iad,ord), as Fly's documentation says it
// must not be; empty names in it are dropped. An empty header is the zero
// Replay. Parse fails on a field without a value, an unterminated or
// malformed quoted value, a control character, a known key given twice, and
// an elsewhere value other than true or false.
func Parse(h string) (Replay, error) {
	var (
		r    Replay
		seen uint8
	)
	sc := scanner{rest: h, header: "fly-replay"}
	for {
		key, val, ok, err := sc.next()
		if err != nil {
			return Replay{}, err
		}
		if !ok {
			return r, nil
		}
		var bit uint8
		switch key {
		case "region":
			bit = 1 << 0
			r.Region = splitRegions(val)
		case "instance":
			bit = 1 << 1
			r.Instance = val
		case "prefer_instance":
			bit = 1 << 2
			r.PreferInstance = val
		case "app":
			bit = 1 << 3
			r.App = val
		case "state":
			bit = 1 << 4
			r.State = val
		case "elsewhere":
			bit = 1 << 5
			switch {
			case strings.EqualFold(val, "true"):
				r.Elsewhere = true
			case strings.EqualFold(val, "false"):
				r.Elsewhere = false
			default:
				return Replay{}, fmt.Errorf("fly-replay: field elsewhere: got %q, want true or false", val)
			}
		case "timeout":
			bit = 1 << 6
			r.Timeout = val
		case "fallback":
			bit = 1 << 7
			r.Fallback = val
		default:
			r.Extra = append(r.Extra, Field{Key: key, Value: val})
			continue
		}
		if seen&bit != 0 {
			return Replay{}, fmt.Errorf("fly-replay: field %s given twice", key)
		}
		seen |= bit
	}
}

// String formats r as a fly-replay header value, leaving out empty fields
// and elsewhere=false. A value is quoted when it contains white space, a
// control or non-ASCII byte, or any of ;,"=\ (so a region list is always
// quoted, as Fly requires). A value with a control character other than tab
// cannot be sent in an HTTP header, quoted or not.
func (r Replay) String() string {
	var b builder
	b.Grow(len(`region="";instance=;state=`) + 4*len(r.Region) + len(r.Instance) + len(r.State))
	if len(r.Region) > 0 {
		b.key("region")
		b.quotedList(r.Region)
	}
	b.field("instance", r.Instance)
	b.field("prefer_instance", r.PreferInstance)
	b.field("app", r.App)
	b.field("state", r.State)
	if r.Elsewhere {
		b.field("elsewhere", "true")
	}
	b.field("timeout", r.Timeout)
	b.field("fallback", r.Fallback)
	b.extra(r.Extra)
	return b.String()
}

// splitRegions splits a region list at commas, trimming each name and
// dropping empty ones; it returns nil when none is left.
func splitRegions(v string) []string {
	var regions []string
	for r := range strings.SplitSeq(v, ",") {
		if r = trimSpace(r); r != "" {
			if regions == nil {
				regions = make([]string, 0, strings.Count(v, ",")+1)
			}
			regions = append(regions, r)
		}
	}
	return regions
}

// Src is a fly-replay-src request header: where a replayed request was
// replayed from.
type Src struct {
	// Instance is the machine that answered with fly-replay (instance=).
	Instance string
	// Region is the region that machine runs in (region=).
	Region string
	// Time is when the proxy replayed the request (t=, microseconds since
	// the Unix epoch); it is the zero Time when the header has no t.
	Time time.Time
	// State is the state of the fly-replay header, if it had one (state=).
	State string
	// Extra holds fields this package does not know, as in Replay.
	Extra []Field
}

// ParseSrc reads one fly-replay-src header value, with the same grammar as
// Parse; t must be a decimal integer. It does not split a value into which a
// proxy has joined several headers with commas: pass each value of
// http.Header.Values separately.
func ParseSrc(h string) (Src, error) {
	var (
		s    Src
		seen uint8
	)
	sc := scanner{rest: h, header: "fly-replay-src"}
	for {
		key, val, ok, err := sc.next()
		if err != nil {
			return Src{}, err
		}
		if !ok {
			return s, nil
		}
		var bit uint8
		switch key {
		case "instance":
			bit = 1 << 0
			s.Instance = val
		case "region":
			bit = 1 << 1
			s.Region = val
		case "t":
			bit = 1 << 2
			us, err := strconv.ParseInt(val, 10, 64)
			if err != nil {
				return Src{}, fmt.Errorf("fly-replay-src: field t: got %q, want microseconds since the Unix epoch", val)
			}
			s.Time = time.UnixMicro(us)
		case "state":
			bit = 1 << 3
			s.State = val
		default:
			s.Extra = append(s.Extra, Field{Key: key, Value: val})
			continue
		}
		if seen&bit != 0 {
			return Src{}, fmt.Errorf("fly-replay-src: field %s given twice", key)
		}
		seen |= bit
	}
}

// SplitJoined splits a header value into which a proxy may have joined several
// values with commas (RFC 9110 5.3); a comma inside a quoted string does not
// split. Empty parts are dropped.
func SplitJoined(h string) []string {
	var parts []string
	quoted, escaped, start := false, false, 0
	for i := 0; i < len(h); i++ {
		switch c := h[i]; {
		case escaped:
			escaped = false
		case quoted && c == '\\':
			escaped = true
		case c == '"':
			quoted = !quoted
		case c == ',' && !quoted:
			if p := trimSpace(h[start:i]); p != "" {
				parts = append(parts, p)
			}
			start = i + 1
		}
	}
	if p := trimSpace(h[start:]); p != "" {
		parts = append(parts, p)
	}
	return parts
}

// String formats s as a fly-replay-src header value, leaving out empty
// fields and t when Time is zero; values are quoted as by Replay.String.
func (s Src) String() string {
	var b builder
	b.Grow(len("instance=;region=;t=1700000000000000;state=") + len(s.Instance) + len(s.Region) + len(s.State))
	b.field("instance", s.Instance)
	b.field("region", s.Region)
	if !s.Time.IsZero() {
		b.key("t")
		var buf [20]byte
		b.Write(strconv.AppendInt(buf[:0], s.Time.UnixMicro(), 10))
	}
	b.field("state", s.State)
	b.extra(s.Extra)
	return b.String()
}

// scanner reads the fields of a header value one at a time.
type scanner struct {
	rest   string // what is left to read
	header string // the header's name, for errors
	n      int    // fields read so far, for errors
}

// errEnd is what unquote returns for a quoted string without its closing
// quote.
var errEnd = errors.New("unterminated quoted value")

// next returns the next field, its key lowercased and its value unquoted, or
// ok false at the end of the value.
func (sc *scanner) next() (key, val string, ok bool, err error) {
	for {
		sc.rest = trimSpace(sc.rest)
		if sc.rest == "" {
			return "", "", false, nil
		}
		if sc.rest[0] != ';' {
			break
		}
		sc.rest = sc.rest[1:] // an empty field
	}
	sc.n++
	i := 0
	for i < len(sc.rest) && isTokenChar(sc.rest[i]) {
		i++
	}
	if i == 0 {
		return "", "", false, fmt.Errorf("%s: field %d: got %q, want a field name", sc.header, sc.n, clip(sc.rest))
	}
	key = strings.ToLower(sc.rest[:i])
	sc.rest = trimSpace(sc.rest[i:])
	if sc.rest == "" || sc.rest[0] != '=' {
		return "", "", false, fmt.Errorf("%s: field %s has no value (want %s=<value>)", sc.header, key, key)
	}
	sc.rest = trimSpace(sc.rest[1:])

	if sc.rest != "" && sc.rest[0] == '"' {
		val, sc.rest, err = unquote(sc.rest[1:])
		if err != nil {
			return "", "", false, fmt.Errorf("%s: field %s: %w", sc.header, key, err)
		}
		sc.rest = trimSpace(sc.rest)
		if sc.rest != "" && sc.rest[0] != ';' {
			return "", "", false, fmt.Errorf("%s: field %s: got %q after the closing quote, want ; or the end", sc.header, key, clip(sc.rest))
		}
	} else {
		end := strings.IndexByte(sc.rest, ';')
		if end < 0 {
			end = len(sc.rest)
		}
		val = trimSpace(sc.rest[:end])
		sc.rest = sc.rest[end:]
		for i := 0; i < len(val); i++ {
			switch c := val[i]; {
			case c == '"':
				return "", "", false, fmt.Errorf("%s: field %s: a quote inside an unquoted value (quote the whole value)", sc.header, key)
			case isControl(c):
				return "", "", false, fmt.Errorf("%s: field %s: control character %q", sc.header, key, c)
			}
		}
	}
	if sc.rest != "" {
		sc.rest = sc.rest[1:] // the ';'
	}
	return key, val, true, nil
}

// unquote reads a quoted string whose opening quote is already consumed and
// returns its value and what follows the closing quote. It allocates only
// when the string has a backslash escape.
func unquote(s string) (val, rest string, err error) {
	for i := 0; i < len(s); i++ {
		switch c := s[i]; {
		case c == '"':
			return s[:i], s[i+1:], nil
		case c == '\\':
			return unescape(s, i)
		case isControl(c):
			return "", "", fmt.Errorf("control character %q in a quoted value", c)
		}
	}
	return "", "", errEnd
}

// unescape finishes unquote from the first backslash, at s[i].
func unescape(s string, i int) (val, rest string, err error) {
	var b strings.Builder
	b.Grow(len(s))
	b.WriteString(s[:i])
	for ; i < len(s); i++ {
		c := s[i]
		switch {
		case c == '"':
			return b.String(), s[i+1:], nil
		case c == '\\':
			i++
			if i == len(s) {
				return "", "", errEnd
			}
			c = s[i]
		}
		if isControl(c) {
			return "", "", fmt.Errorf("control character %q in a quoted value", c)
		}
		b.WriteByte(c)
	}
	return "", "", errEnd
}

// builder writes fields separated by ';'.
type builder struct{ strings.Builder }

// key starts a field.
func (b *builder) key(k string) {
	if b.Len() > 0 {
		b.WriteByte(';')
	}
	b.WriteString(k)
	b.WriteByte('=')
}

// field writes k=v, quoting v if needed, unless v is empty.
func (b *builder) field(k, v string) {
	if v == "" {
		return
	}
	b.key(k)
	b.value(v)
}

// extra writes fields of unknown keys; an empty value is written as "".
func (b *builder) extra(fields []Field) {
	for _, f := range fields {
		b.key(f.Key)
		b.value(f.Value)
	}
}

// value writes v, quoted if it needs to be.
func (b *builder) value(v string) {
	if v != "" && !needsQuote(v) {
		b.WriteString(v)
		return
	}
	b.WriteByte('"')
	b.escaped(v)
	b.WriteByte('"')
}

// quotedList writes a comma list as one value, quoted if it needs to be.
func (b *builder) quotedList(list []string) {
	quote := len(list) > 1
	for _, v := range list {
		quote = quote || needsQuote(v)
	}
	if quote {
		b.WriteByte('"')
	}
	for i, v := range list {
		if i > 0 {
			b.WriteByte(',')
		}
		if quote {
			b.escaped(v)
		} else {
			b.WriteString(v)
		}
	}
	if quote {
		b.WriteByte('"')
	}
}

// escaped writes v with a backslash before each '"' and '\'.
func (b *builder) escaped(v string) {
	for i := 0; i < len(v); i++ {
		if c := v[i]; c == '"' || c == '\\' {
			b.WriteByte('\\')
		}
		b.WriteByte(v[i])
	}
}

// needsQuote reports whether v must be quoted: it has a byte that is not a
// printable ASCII character other than space, or one of ;,"=\.
func needsQuote(v string) bool {
	for i := 0; i < len(v); i++ {
		switch c := v[i]; {
		case c <= ' ' || c >= 0x7f:
			return true
		case c == ';' || c == ',' || c == '"' || c == '=' || c == '\\':
			return true
		}
	}
	return false
}

// isTokenChar reports whether c may appear in a field name (an RFC 9110
// token).
func isTokenChar(c byte) bool {
	switch {
	case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9':
		return true
	}
	return strings.IndexByte("!#$%&'*+-.^_`|~", c) >= 0
}

// isControl reports whether c is a control character that an HTTP header
// value cannot hold (all but tab).
func isControl(c byte) bool { return (c < ' ' && c != '\t') || c == 0x7f }

func trimSpace(s string) string { return strings.Trim(s, " \t") }

// clip shortens s for an error message.
func clip(s string) string {
	if len(s) > 20 {
		return s[:20] + "..."
	}
	return s
}
