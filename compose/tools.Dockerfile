# Real servers and clients for the examples, the Docker tests and the bench: redis-server and
# redis-tools, MariaDB server and client (seeded with Istio's `test.ratings`, root/password),
# curl, openssl, netcat, nginx with its stream module. The .deb files are fetched on the host
# side by compose/images.sh (resolved against this very base), so the build needs no network.
ARG BASE_IMAGE=python:3.12-slim
FROM ${BASE_IMAGE}
COPY debs /debs
COPY mysqldb.cnf /etc/mysql/mariadb.conf.d/60-mysqldb.cnf
# apt-get, not dpkg -i, orders the unpacking (Pre-Depends); every file is local, nothing is fetched.
# policy-rc.d: no package may start its service while installed (there is no init here).
RUN printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends /debs/*.deb \
        > /var/log/tools-install.log 2>&1 \
    || { tail -30 /var/log/tools-install.log; exit 1; }; rm -rf /debs /var/cache/apt/*
COPY mysqldb-init.sql /usr/local/share/mysqldb-init.sql
COPY mysqldb.sh /usr/local/bin/mysqldb
# The database is made and seeded here, once, so a container serves it at once when started.
RUN chmod +x /usr/local/bin/mysqldb && /usr/local/bin/mysqldb --seed
CMD ["sleep", "infinity"]
