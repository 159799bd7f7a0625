package pgcluster

import (
	"context"
	"fmt"
	"strings"

	"github.com/jackc/pgx/v5"
)

// Database is the database the cluster creates for tests; every test role
// may create and use tables in its public schema.
const Database = "pgfly"

// superuser is the bootstrap superuser the helper itself connects as.
const superuser = "postgres"

// Role is a login role the cluster creates on the primary (and so on the
// replica), with the pg_hba.conf method that authenticates it over TCP.
type Role struct {
	// Name is the role name.
	Name string
	// Password is the role's password, empty for trust roles.
	Password string
	// Method is the pg_hba.conf authentication method for the role.
	Method string
}

// The roles the cluster creates. Tests should use these rather than spelling
// names and passwords out.
var (
	// RoleSuperuser is the bootstrap superuser, trusted without a password.
	RoleSuperuser = Role{Name: superuser, Method: "trust"}
	// RoleTrust is an ordinary role trusted without a password.
	RoleTrust = Role{Name: "pgfly_trust", Method: "trust"}
	// RolePassword authenticates with a cleartext password.
	RolePassword = Role{Name: "pgfly_password", Password: "pw-cleartext", Method: "password"}
	// RoleMD5 authenticates with an MD5 challenge; its password is stored
	// MD5-encrypted so the server cannot upgrade it to SCRAM.
	RoleMD5 = Role{Name: "pgfly_md5", Password: "pw-md5", Method: "md5"}
	// RoleSCRAM authenticates with SCRAM-SHA-256.
	RoleSCRAM = Role{Name: "pgfly_scram", Password: "pw-scram", Method: "scram-sha-256"}
)

// Roles returns the non-superuser test roles, one per authentication method.
func Roles() []Role {
	return []Role{RoleTrust, RolePassword, RoleMD5, RoleSCRAM}
}

// hbaConf returns the pg_hba.conf both servers use: per-role methods over TCP
// first, then the trusted superuser, then SCRAM for anyone else. The host
// lines match connections with and without TLS.
func hbaConf() string {
	var b strings.Builder
	b.WriteString("# Written by pgfly's pgcluster.\n")
	b.WriteString("local all all trust\n")
	b.WriteString("host replication all 127.0.0.1/32 trust\n")
	for _, r := range append(Roles(), RoleSuperuser) {
		for _, addr := range []string{"127.0.0.1/32", "::1/128"} {
			fmt.Fprintf(&b, "host all %s %s %s\n", r.Name, addr, r.Method)
		}
	}
	b.WriteString("host all all 127.0.0.1/32 scram-sha-256\n")
	b.WriteString("host all all ::1/128 scram-sha-256\n")
	return b.String()
}

// createRoles creates the test roles and the pgfly database on the primary.
func (c *Cluster) createRoles(ctx context.Context) error {
	conn, err := c.Primary.connect(ctx, nil)
	if err != nil {
		return err
	}
	defer conn.Close(context.WithoutCancel(ctx))

	var stmts, names []string
	for _, r := range Roles() {
		encryption := "scram-sha-256"
		if r.Method == "md5" {
			encryption = "md5"
		}
		stmt := "CREATE ROLE " + ident(r.Name) + " LOGIN"
		if r.Password != "" {
			stmt += " PASSWORD " + literal(r.Password)
		}
		stmts = append(stmts, "SET password_encryption = "+literal(encryption), stmt)
		names = append(names, ident(r.Name))
	}
	grantees := strings.Join(names, ", ")
	stmts = append(stmts,
		"RESET password_encryption",
		"CREATE DATABASE "+ident(Database)+" OWNER "+ident(superuser),
		"GRANT ALL ON DATABASE "+ident(Database)+" TO "+grantees,
	)
	if err := execAll(ctx, conn, stmts); err != nil {
		return err
	}

	// Schema privileges are per database.
	cfg := conn.Config().Copy()
	cfg.Database = Database
	db, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		return fmt.Errorf("connect to %s database: %w", Database, err)
	}
	defer db.Close(context.WithoutCancel(ctx))
	owners := ident(superuser) + ", " + grantees
	return execAll(ctx, db, []string{
		"GRANT ALL ON SCHEMA public TO " + grantees,
		"ALTER DEFAULT PRIVILEGES FOR ROLE " + owners + " IN SCHEMA public GRANT ALL ON TABLES TO " + grantees,
		"ALTER DEFAULT PRIVILEGES FOR ROLE " + owners + " IN SCHEMA public GRANT ALL ON SEQUENCES TO " + grantees,
	})
}

// execAll runs statements one by one; CREATE DATABASE cannot share a
// transaction.
func execAll(ctx context.Context, conn *pgx.Conn, stmts []string) error {
	for _, stmt := range stmts {
		if _, err := conn.Exec(ctx, stmt); err != nil {
			// Statements may contain passwords: name the statement only.
			verb, _, _ := strings.Cut(stmt, " PASSWORD ")
			return fmt.Errorf("set up roles: %s: %w", verb, err)
		}
	}
	return nil
}

// ident quotes a SQL identifier.
func ident(s string) string {
	return pgx.Identifier{s}.Sanitize()
}

// literal quotes a SQL string literal (standard_conforming_strings is on).
func literal(s string) string {
	return "'" + strings.ReplaceAll(s, "'", "''") + "'"
}
