package flyreplay_test

import (
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/pgfly/pgfly/internal/flyreplay"
)

func TestParse(t *testing.T) {
	tests := []struct {
		name string
		in   string
		want flyreplay.Replay
	}{
		{name: "empty", in: "", want: flyreplay.Replay{}},
		{name: "region", in: "region=sjc", want: flyreplay.Replay{Region: []string{"sjc"}}},
		{name: "region and state, as pgfly writes them", in: "region=iad;state=pgfly_read_only",
			want: flyreplay.Replay{Region: []string{"iad"}, State: "pgfly_read_only"}},
		{name: "quoted region list", in: `region="iad,ord,us,na"`,
			want: flyreplay.Replay{Region: []string{"iad", "ord", "us", "na"}}},
		{name: "unquoted region list", in: "region=iad,ord", want: flyreplay.Replay{Region: []string{"iad", "ord"}}},
		{name: "region list with spaces and empty names", in: `region=" iad , ,ord,"`,
			want: flyreplay.Replay{Region: []string{"iad", "ord"}}},
		{name: "empty region", in: `region=""`, want: flyreplay.Replay{}},
		{name: "every known field",
			in: "region=sjc;instance=00bb33ff;prefer_instance=11cc;app=worker;state=s;elsewhere=true;timeout=800ms;fallback=prefer_self",
			want: flyreplay.Replay{Region: []string{"sjc"}, Instance: "00bb33ff", PreferInstance: "11cc", App: "worker",
				State: "s", Elsewhere: true, Timeout: "800ms", Fallback: "prefer_self"}},
		{name: "keys are case-insensitive", in: "Region=sjc;STATE=x;Elsewhere=TRUE",
			want: flyreplay.Replay{Region: []string{"sjc"}, State: "x", Elsewhere: true}},
		{name: "elsewhere=false", in: "app=a;elsewhere=false", want: flyreplay.Replay{App: "a"}},
		{name: "white space and empty fields", in: " ; state = \"x y\" ;; app=other ;region=b;elsewhere=true; ",
			want: flyreplay.Replay{Region: []string{"b"}, App: "other", State: "x y", Elsewhere: true}},
		{name: "quoted state with ; and escaped quotes", in: `state="a;b=\"c\"\\d";region=iad`,
			want: flyreplay.Replay{Region: []string{"iad"}, State: `a;b="c"\d`}},
		{name: "unquoted value keeps inner spaces and =", in: "state=x y==",
			want: flyreplay.Replay{State: "x y=="}},
		{name: "quoted empty state", in: `state=""`, want: flyreplay.Replay{}},
		{name: "tab and non-ASCII are kept", in: "state=\"a\tb\";app=caf\u00e9",
			want: flyreplay.Replay{State: "a\tb", App: "caf\u00e9"}},
		{name: "unknown fields are kept in order, keys lowercased", in: "Zone=1;region=sjc;x-y=\"a,b\";zone=2",
			want: flyreplay.Replay{Region: []string{"sjc"},
				Extra: []flyreplay.Field{{Key: "zone", Value: "1"}, {Key: "x-y", Value: "a,b"}, {Key: "zone", Value: "2"}}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := flyreplay.Parse(tt.in)
			if err != nil {
				t.Fatalf("Parse(%q): got error %v, want none", tt.in, err)
			}
			if !reflect.DeepEqual(got, tt.want) {
				t.Errorf("Parse(%q):\ngot  %#v\nwant %#v", tt.in, got, tt.want)
			}
		})
	}
}

func TestParseRejects(t *testing.T) {
	tests := []struct {
		name    string
		in      string
		wantErr string
	}{
		{name: "field without =", in: "region=sjc;elsewhere", wantErr: "field elsewhere has no value"},
		{name: "no field name", in: "=sjc", wantErr: "want a field name"},
		{name: "field name with a space", in: "my region=sjc", wantErr: "field my has no value"},
		{name: "unterminated quote", in: `region=sjc;state="abc`, wantErr: "field state: unterminated quoted value"},
		{name: "backslash at the end", in: `state="abc\`, wantErr: "unterminated quoted value"},
		{name: "text after the closing quote", in: `state="a"b;region=sjc`, wantErr: `got "b;region=sjc" after the closing quote`},
		{name: "quote inside an unquoted value", in: `state=a"b"`, wantErr: "a quote inside an unquoted value"},
		{name: "control character unquoted", in: "state=a\x01b", wantErr: "control character"},
		{name: "control character quoted", in: "state=\"a\nb\"", wantErr: "control character"},
		{name: "escaped control character", in: "state=\"a\\\x7fb\"", wantErr: "control character"},
		{name: "elsewhere not a boolean", in: "region=sjc;elsewhere=yes", wantErr: `field elsewhere: got "yes", want true or false`},
		{name: "known key twice", in: "region=sjc;Region=iad", wantErr: "field region given twice"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := flyreplay.Parse(tt.in)
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("Parse(%q): got %#v, error %v, want an error containing %q", tt.in, got, err, tt.wantErr)
			}
			if !strings.HasPrefix(err.Error(), "fly-replay: ") {
				t.Errorf("Parse(%q): got error %q, want it to start with the header's name", tt.in, err)
			}
		})
	}
}

func TestString(t *testing.T) {
	tests := []struct {
		name string
		r    flyreplay.Replay
		want string
	}{
		{name: "zero", r: flyreplay.Replay{}, want: ""},
		{name: "region and state", r: flyreplay.Replay{Region: []string{"iad"}, State: "pgfly_read_only"},
			want: "region=iad;state=pgfly_read_only"},
		{name: "a region list is quoted", r: flyreplay.Replay{Region: []string{"sjc", "any"}, App: "worker"},
			want: `region="sjc,any";app=worker`},
		{name: "every known field, in order",
			r: flyreplay.Replay{Fallback: "force_self", Timeout: "10s", Elsewhere: true, State: "s", App: "a",
				PreferInstance: "p", Instance: "i", Region: []string{"r"}},
			want: "region=r;instance=i;prefer_instance=p;app=a;state=s;elsewhere=true;timeout=10s;fallback=force_self"},
		{name: "state with ; and quotes", r: flyreplay.Replay{State: `a;b "c" \d`}, want: `state="a;b \"c\" \\d"`},
		{name: "state with =", r: flyreplay.Replay{State: "k=v"}, want: `state="k=v"`},
		{name: "comma", r: flyreplay.Replay{State: "a,b"}, want: `state="a,b"`},
		{name: "tab", r: flyreplay.Replay{State: "a\tb"}, want: "state=\"a\tb\""},
		{name: "non-ASCII", r: flyreplay.Replay{State: "caf\u00e9"}, want: "state=\"caf\u00e9\""},
		{name: "extra fields after known ones, an empty value quoted",
			r:    flyreplay.Replay{Extra: []flyreplay.Field{{Key: "zone", Value: ""}, {Key: "x", Value: "1"}}, Region: []string{"a"}},
			want: `region=a;zone="";x=1`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := tt.r.String(); got != tt.want {
				t.Errorf("String: got %q, want %q", got, tt.want)
			}
			back, err := flyreplay.Parse(tt.want)
			if err != nil {
				t.Fatalf("Parse(%q): %v", tt.want, err)
			}
			if !reflect.DeepEqual(back, tt.r) {
				t.Errorf("Parse(%q):\ngot  %#v\nwant %#v", tt.want, back, tt.r)
			}
		})
	}
}

func TestParseSrc(t *testing.T) {
	tests := []struct {
		name string
		in   string
		want flyreplay.Src
	}{
		{name: "empty", in: "", want: flyreplay.Src{}},
		{name: "as Fly writes it", in: "instance=00bb33ff;region=fra;t=1700000000123456;state=pgfly_read_only",
			want: flyreplay.Src{Instance: "00bb33ff", Region: "fra", Time: time.UnixMicro(1700000000123456), State: "pgfly_read_only"}},
		{name: "no t, no state", in: "region=fra", want: flyreplay.Src{Region: "fra"}},
		{name: "t zero is the epoch, not absent", in: "t=0", want: flyreplay.Src{Time: time.UnixMicro(0)}},
		{name: "quoted state", in: `region=fra;state="x;\"y\""`, want: flyreplay.Src{Region: "fra", State: `x;"y"`}},
		{name: "headers joined with a comma are not split", in: "region=fra;state=a, instance=b",
			want: flyreplay.Src{Region: "fra", State: "a, instance=b"}},
		{name: "unknown fields kept", in: "region=fra;zone=b", want: flyreplay.Src{Region: "fra",
			Extra: []flyreplay.Field{{Key: "zone", Value: "b"}}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := flyreplay.ParseSrc(tt.in)
			if err != nil {
				t.Fatalf("ParseSrc(%q): got error %v, want none", tt.in, err)
			}
			if !equalSrc(got, tt.want) {
				t.Errorf("ParseSrc(%q):\ngot  %#v\nwant %#v", tt.in, got, tt.want)
			}
		})
	}
}

func TestParseSrcRejects(t *testing.T) {
	tests := []struct {
		name    string
		in      string
		wantErr string
	}{
		{name: "t not a number", in: "region=fra;t=soon", wantErr: `field t: got "soon", want microseconds`},
		{name: "t out of range", in: "t=99999999999999999999", wantErr: "field t"},
		{name: "region twice", in: "region=fra;region=iad", wantErr: "field region given twice"},
		{name: "unterminated quote", in: `region=fra;state="x`, wantErr: "unterminated quoted value"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := flyreplay.ParseSrc(tt.in)
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("ParseSrc(%q): got %#v, error %v, want an error containing %q", tt.in, got, err, tt.wantErr)
			}
			if !strings.HasPrefix(err.Error(), "fly-replay-src: ") {
				t.Errorf("ParseSrc(%q): got error %q, want it to start with the header's name", tt.in, err)
			}
		})
	}
}

func TestSrcString(t *testing.T) {
	tests := []struct {
		name string
		s    flyreplay.Src
		want string
	}{
		{name: "zero", s: flyreplay.Src{}, want: ""},
		{name: "every field", s: flyreplay.Src{State: "w", Time: time.UnixMicro(1700000000123456), Region: "fra", Instance: "fra-local"},
			want: "instance=fra-local;region=fra;t=1700000000123456;state=w"},
		{name: "time is written in microseconds, truncated", s: flyreplay.Src{Time: time.Unix(1, 2500)}, want: "t=1000002"},
		{name: "state with a space and a quote", s: flyreplay.Src{Region: "fra", State: `x "y"`}, want: `region=fra;state="x \"y\""`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := tt.s.String(); got != tt.want {
				t.Errorf("String: got %q, want %q", got, tt.want)
			}
		})
	}
}

// equalSrc compares Srcs, their times by Time.Equal.
func equalSrc(a, b flyreplay.Src) bool {
	return a.Time.Equal(b.Time) && a.Time.IsZero() == b.Time.IsZero() &&
		a.Instance == b.Instance && a.Region == b.Region && a.State == b.State && reflect.DeepEqual(a.Extra, b.Extra)
}

var fuzzSeeds = []string{
	"", "region=sjc", `region="iad,ord";state=captured_write`, "instance=00bb33ff;elsewhere=true",
	`state="a;b=\"c\"\\d";region=iad`, " ; state = \"x y\" ;; app=other ;region=b", "region=a;region=b",
	"instance=fra-1;region=fra;t=1700000000000000;state=pgfly_read_only", `state="abc\`, "t=-1;zone=\"\"",
	"app=caf\u00e9;timeout=10s;fallback=force_self;x=1", "elsewhere=TRUE;state=k==",
}

// FuzzParse checks that String writes back what Parse read.
func FuzzParse(f *testing.F) {
	for _, s := range fuzzSeeds {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, in string) {
		r, err := flyreplay.Parse(in)
		if err != nil {
			return
		}
		out := r.String()
		back, err := flyreplay.Parse(out)
		if err != nil {
			t.Fatalf("Parse(%q) = %#v; Parse of its String %q: %v", in, r, out, err)
		}
		if !reflect.DeepEqual(back, r) {
			t.Fatalf("Parse(%q) = %#v; Parse of its String %q = %#v", in, r, out, back)
		}
	})
}

// FuzzParseSrc checks that Src.String writes back what ParseSrc read.
func FuzzParseSrc(f *testing.F) {
	for _, s := range fuzzSeeds {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, in string) {
		s, err := flyreplay.ParseSrc(in)
		if err != nil {
			return
		}
		out := s.String()
		back, err := flyreplay.ParseSrc(out)
		if err != nil {
			t.Fatalf("ParseSrc(%q) = %#v; ParseSrc of its String %q: %v", in, s, out, err)
		}
		if !equalSrc(back, s) {
			t.Fatalf("ParseSrc(%q) = %#v; ParseSrc of its String %q = %#v", in, s, out, back)
		}
	})
}

func BenchmarkParse(b *testing.B) {
	b.ReportAllocs()
	for b.Loop() {
		if _, err := flyreplay.Parse(`region="iad,ord";state=pgfly_read_only`); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkReplayString(b *testing.B) {
	r := flyreplay.Replay{Region: []string{"iad"}, State: "pgfly_read_only"}
	b.ReportAllocs()
	for b.Loop() {
		_ = r.String()
	}
}

func BenchmarkParseSrc(b *testing.B) {
	b.ReportAllocs()
	for b.Loop() {
		if _, err := flyreplay.ParseSrc("instance=fra-1;region=fra;t=1700000000000000;state=pgfly_read_only"); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkSrcString(b *testing.B) {
	s := flyreplay.Src{Instance: "fra-1", Region: "fra", Time: time.UnixMicro(1700000000000000), State: "pgfly_read_only"}
	b.ReportAllocs()
	for b.Loop() {
		_ = s.String()
	}
}

func TestSplitJoined(t *testing.T) {
	for _, tt := range []struct {
		in   string
		want []string
	}{
		{"", nil},
		{"instance=a;state=x", []string{"instance=a;state=x"}},
		{"instance=a;state=x, instance=b;state=y", []string{"instance=a;state=x", "instance=b;state=y"}},
		{`state="a,b", region=iad`, []string{`state="a,b"`, "region=iad"}},
		{`state="a\",b", region=iad`, []string{`state="a\",b"`, "region=iad"}},
		{" , ,region=iad,", []string{"region=iad"}},
	} {
		if got := flyreplay.SplitJoined(tt.in); !slices.Equal(got, tt.want) {
			t.Errorf("SplitJoined(%q) = %q, want %q", tt.in, got, tt.want)
		}
	}
}
