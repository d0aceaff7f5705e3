#!/bin/sh
# MariaDB as bookinfo's mysqldb: database `test` (examples/bookinfo/mysql/mysqldb-init.sql) and
# root/password from any host, as Istio's image has them. `mysqldb` serves port 3306 in the
# foreground; `mysqldb --seed`, run once at image build, creates and seeds the database.
set -eu
mkdir -p /run/mysqld
chown mysql:mysql /run/mysqld
if [ "${1:-}" != --seed ]; then
    exec mariadbd --user=mysql --bind-address=0.0.0.0 --port=3306 "$@"
fi
[ -d /var/lib/mysql/mysql ] || mariadb-install-db --user=mysql --skip-test-db > /dev/null
mariadbd --user=mysql --skip-networking &
tries=0
until mariadb-admin ping --silent 2> /dev/null; do
    tries=$((tries + 1))
    [ "$tries" -lt 120 ] || { echo "mysqldb --seed: mariadbd did not start within 60 s" >&2; exit 1; }
    sleep 0.5
done
mariadb < /usr/local/share/mysqldb-init.sql
mariadb -e "CREATE USER 'root'@'%' IDENTIFIED BY 'password'; GRANT ALL PRIVILEGES ON *.* TO 'root'@'%' WITH GRANT OPTION;"
mariadb-admin shutdown
wait
