package regions

import "time"

// NewUserspaceLink is a link cut in userspace even where namespaces are available, so that
// the tests cover the fallback too.
func NewUserspaceLink(d time.Duration) (*Link, error) { return newLink(d, false) }
