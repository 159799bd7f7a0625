package lag_test

import (
	"math"
	"testing"

	"github.com/pgfly/pgfly/lag"
)

func TestParseLSN(t *testing.T) {
	for _, tt := range []struct {
		name    string
		in      string
		want    lag.LSN
		wantErr bool
	}{
		{name: "zero", in: "0/0", want: 0},
		{name: "typical", in: "16/B374D848", want: 0x16_B374D848},
		{name: "lowercase", in: "16/b374d848", want: 0x16_B374D848},
		{name: "mixed case", in: "aB/Cd", want: 0xAB_000000CD},
		{name: "leading zeros", in: "00000001/00000002", want: 1<<32 | 2},
		{name: "largest", in: "FFFFFFFF/FFFFFFFF", want: math.MaxUint64},
		{name: "empty", in: "", wantErr: true},
		{name: "no slash", in: "16B374D848", wantErr: true},
		{name: "missing upper half", in: "/B374D848", wantErr: true},
		{name: "missing lower half", in: "16/", wantErr: true},
		{name: "two slashes", in: "16/B374/D848", wantErr: true},
		{name: "nine digits", in: "123456789/0", wantErr: true},
		{name: "nine digits below", in: "0/123456789", wantErr: true},
		{name: "hex prefix", in: "0x16/B374D848", wantErr: true},
		{name: "plus sign", in: "+16/B374D848", wantErr: true},
		{name: "minus sign", in: "16/-1", wantErr: true},
		{name: "leading space", in: " 16/B374D848", wantErr: true},
		{name: "trailing space", in: "16/B374D848 ", wantErr: true},
		{name: "space after slash", in: "16/ B374D848", wantErr: true},
		{name: "not hex", in: "16/B374G848", wantErr: true},
		{name: "underscore", in: "16/B374_D848", wantErr: true},
	} {
		t.Run(tt.name, func(t *testing.T) {
			got, err := lag.ParseLSN(tt.in)
			if tt.wantErr {
				if err == nil {
					t.Fatalf("ParseLSN(%q) = %v, want an error", tt.in, got)
				}
				return
			}
			if err != nil {
				t.Fatalf("ParseLSN(%q): %v", tt.in, err)
			}
			if got != tt.want {
				t.Errorf("ParseLSN(%q) = %#x, want %#x", tt.in, uint64(got), uint64(tt.want))
			}
		})
	}
}

func TestLSNString(t *testing.T) {
	for _, tt := range []struct {
		name string
		in   lag.LSN
		want string
	}{
		{name: "zero", in: 0, want: "0/0"},
		{name: "typical", in: 0x16_B374D848, want: "16/B374D848"},
		{name: "no leading zeros", in: 1<<32 | 2, want: "1/2"},
		{name: "lower half only", in: 0x3000060, want: "0/3000060"},
		{name: "largest", in: math.MaxUint64, want: "FFFFFFFF/FFFFFFFF"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			got := tt.in.String()
			if got != tt.want {
				t.Errorf("String() = %q, want %q", got, tt.want)
			}
			back, err := lag.ParseLSN(got)
			if err != nil {
				t.Fatalf("ParseLSN(%q): %v", got, err)
			}
			if back != tt.in {
				t.Errorf("ParseLSN(String()) = %v, want %v", back, tt.in)
			}
		})
	}
}
