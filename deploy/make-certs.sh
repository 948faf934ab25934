#!/bin/sh
# make-certs.sh: a small private CA plus certificates for cdp's TLS (receiver and sources).
#
#   deploy/make-certs.sh OUTDIR SERVER_NAME [SERVER_IP ...]
#
# Writes into OUTDIR (created, mode 700):
#   ca.crt ca.key                the CA (keep ca.key offline once every certificate is made)
#   receiver.crt receiver.key    server certificate for SERVER_NAME (and the IPs), serverAuth
#   <client>.crt <client>.key    one client certificate per name in $CLIENTS (default "host1")
# Run it again with other CLIENTS to add clients: an existing CA is reused, never replaced;
# existing certificates are kept (delete them to renew).
#
# Receiver:  [receiver.tls] cert = "receiver.crt", key = "receiver.key", client_ca = "ca.crt"
# Source:    [source.tls]   ca = "ca.crt", cert = "host1.crt", key = "host1.key"
#            (server_name = SERVER_NAME when the source connects by another name or address)
# Environment: CLIENTS="host1 host2", DAYS=825 (leaf lifetime), CA_DAYS=3650, OPENSSL=openssl
set -eu

usage() { echo "usage: $0 OUTDIR SERVER_NAME [SERVER_IP ...]" >&2; exit 2; }
[ $# -ge 2 ] || usage
out=$1
server=$2
shift 2
CLIENTS=${CLIENTS:-host1}
DAYS=${DAYS:-825}
CA_DAYS=${CA_DAYS:-3650}
OPENSSL=${OPENSSL:-openssl}
command -v "$OPENSSL" >/dev/null 2>&1 || { echo "$0: openssl not found" >&2; exit 1; }

umask 077
mkdir -p "$out"
chmod 700 "$out"
cd "$out"

key() {  # an EC P-256 private key
    "$OPENSSL" genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null
}

if [ ! -f ca.key ]; then
    key ca.key
    "$OPENSSL" req -x509 -new -key ca.key -sha256 -days "$CA_DAYS" -subj "/CN=cdp private CA" \
        -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -addext "subjectKeyIdentifier=hash" -out ca.crt
    echo "made CA: $out/ca.crt"
fi

sign() {  # sign NAME EXTFILE: NAME.key -> NAME.crt
    "$OPENSSL" req -new -key "$1.key" -subj "/CN=$3" -out "$1.csr"
    "$OPENSSL" x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -sha256 \
        -days "$DAYS" -extfile "$2" -out "$1.crt" 2>/dev/null
    rm -f "$1.csr" "$2"
    "$OPENSSL" verify -CAfile ca.crt "$1.crt" >/dev/null
    echo "made $out/$1.crt ($3)"
}

if [ ! -f receiver.crt ]; then
    san="DNS:$server"
    for ip in "$@"; do san="$san,IP:$ip"; done
    key receiver.key
    printf '%s\n' "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature" \
        "extendedKeyUsage=serverAuth" "subjectAltName=$san" "authorityKeyIdentifier=keyid" \
        > receiver.ext
    sign receiver receiver.ext "$server"
fi

for client in $CLIENTS; do
    case $client in
        *[!A-Za-z0-9._-]*|'') echo "$0: bad client name: $client" >&2; exit 2 ;;
    esac
    [ -f "$client.crt" ] && continue
    key "$client.key"
    printf '%s\n' "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature" \
        "extendedKeyUsage=clientAuth" "authorityKeyIdentifier=keyid" > "$client.ext"
    sign "$client" "$client.ext" "$client"
done
chmod 600 ./*.key
chmod 644 ./*.crt
