package lag

import (
	"fmt"
	"strconv"
	"strings"
)

// LSN is a position in the write-ahead log, as Postgres's pg_lsn type.
type LSN uint64

// maxLSNPart is the most hex digits Postgres accepts on either side of the
// slash in a pg_lsn.
const maxLSNPart = 8

// ParseLSN parses a WAL position in Postgres's text form, two hex numbers of
// one to eight digits around a slash such as "16/B374D848". Upper- and
// lowercase digits are accepted; anything else (spaces, signs, a "0x" prefix,
// a missing half) is an error.
func ParseLSN(s string) (LSN, error) {
	hi, lo, ok := strings.Cut(s, "/")
	if !ok {
		return 0, fmt.Errorf("parse LSN %q: want two hex numbers separated by a slash", s)
	}
	h, err := parseLSNPart(hi)
	if err != nil {
		return 0, fmt.Errorf("parse LSN %q: %w", s, err)
	}
	l, err := parseLSNPart(lo)
	if err != nil {
		return 0, fmt.Errorf("parse LSN %q: %w", s, err)
	}
	return LSN(h<<32 | l), nil
}

// parseLSNPart parses one half of an LSN: one to eight hex digits.
func parseLSNPart(s string) (uint64, error) {
	if len(s) == 0 || len(s) > maxLSNPart {
		return 0, fmt.Errorf("%q is not 1 to %d hex digits", s, maxLSNPart)
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !('0' <= c && c <= '9' || 'a' <= c && c <= 'f' || 'A' <= c && c <= 'F') {
			return 0, fmt.Errorf("%q is not 1 to %d hex digits", s, maxLSNPart)
		}
	}
	return strconv.ParseUint(s, 16, 32)
}

// String formats l the way Postgres prints a pg_lsn: "%X/%X" of its upper
// and lower 32 bits, e.g. "16/B374D848" or "0/0".
func (l LSN) String() string {
	return fmt.Sprintf("%X/%X", uint64(l)>>32, uint64(l)&0xFFFFFFFF)
}
