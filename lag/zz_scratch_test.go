package lag_test

import (
	"context"
	"testing"
	"time"

	"github.com/pgfly/pgfly/lag"
)

func TestZZScratch(t *testing.T) {
	m := startMonitor(t, lag.Config{Upstream: monitorURL(cluster.Replica), Primary: monitorURL(cluster.Primary)})
	primary := connect(t, superuserURL(cluster.Primary), map[string]string{"synchronous_commit": "on"})
	ctx := context.Background()
	for i := 0; i < 15; i++ {
		write(t, primary)
		lsn, _ := m.PrimaryLSN(ctx)
		t2 := time.Now()
		prevCheck := m.Status().CheckedAt
		p0 := m.Polls()
		m.WaitFor(ctx, lsn)
		t3 := time.Now()
		p1 := m.Polls()
		t.Logf("start-prevpoll %v waitfor %v polls %d newcheck-start %v", t2.Sub(prevCheck), t3.Sub(t2), p1-p0, m.Status().CheckedAt.Sub(t2))
	}
}
