#!/bin/sh
# make.sh TREE OUT: the directory file that the keyrelay CLI of an older revision (its source
# in TREE) writes for the script below, its key folder named /etc/keyrelay/dkim. The golden
# files v1-REV.yaml here were made with:
#   git archive REV | tar -x -C /tmp/old-REV
#   PYTHON=.venv/bin/python tests/golden/directory/make.sh /tmp/old-REV \
#       tests/golden/directory/v1-REV.yaml
# for 41c91a7 (the first writer: block-style YAML, no failed_checks), a32bf15 (JSON-style
# YAML) and 59eca38 (failed_checks; no retiring_since yet). tests/test_directory_versions.py
# reads them.
set -e
tree=$1; out=$2; root=$(mktemp -d)
cat > $root/keyrelay.yaml <<YAML
directory:
  path: $root/directory.yaml
dkim:
  key_dir: $root/dkim
logging:
  audit_log: $root/audit.log
YAML
kr() { PYTHONPATH=$tree ${PYTHON:-python3} -c 'import sys; from keyrelay.cli import main; sys.exit(main())' --config $root/keyrelay.yaml "$@" >/dev/null; }
kr pool add mkt --bind 192.0.2.10 --helo mkt.relay.example.net
kr account add acme
kr account add beta
kr subuser add acme/marketing
kr key create acme --name crm
kr key create acme/marketing --name news --expires 90d
kr ip allow acme 192.0.2.0/24
kr pool assign acme/marketing mkt
kr sender add acme alerts@example.net
kr limits set acme --per-minute 60
kr monitor on beta
kr account suspend beta
kr domain add acme example.com
kr domain grant example.com acme/marketing
kr domain mark-verified example.com
kr domain rotate example.com
sed "s#$root/dkim#/etc/keyrelay/dkim#g" $root/directory.yaml > $out
rm -rf $root
