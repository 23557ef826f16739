#!/usr/bin/env bash
# Builds kube-apiserver v1.20.2 and fetches etcd 3.4 from Debian bookworm packages, for the
# Kubernetes tests (no registry ships a kube-apiserver binary). Idempotent: exits at once
# when both binaries are in the cache directory. Recipe and pitfalls: ../shared/toolchain.md.
# Touches no system apt state: a private source list, lists and cache under the work dir.
set -euo pipefail
CACHE=${1:?usage: kube-apiserver.sh CACHE_DIR}
if [[ -x $CACHE/kube-apiserver && -x $CACHE/etcd ]]; then
    echo "[setup] kube-apiserver + etcd: present in $CACHE"
    exit 0
fi
VERSION=1.20.5+really1.20.2-1.1+deb12u1
WORK=$(mktemp -d /var/tmp/ra-kube-build.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
echo "[setup] kube-apiserver + etcd: building into $CACHE (about 10 min on 2 cores)"
mkdir -p "$WORK/apt/lists/partial" "$WORK/apt/cache/archives/partial" "$WORK/root" "$CACHE"
cat > "$WORK/apt/sources.list" <<SRC
deb http://deb.debian.org/debian bookworm main
deb-src http://deb.debian.org/debian bookworm main
deb http://deb.debian.org/debian-security bookworm-security main
deb-src http://deb.debian.org/debian-security bookworm-security main
SRC
APT=(-o "Dir::Etc::SourceList=$WORK/apt/sources.list" -o "Dir::Etc::SourceParts=/dev/null"
     -o "Dir::State::Lists=$WORK/apt/lists" -o "Dir::Cache=$WORK/apt/cache"
     -o "APT::Sandbox::User=root")
apt-get "${APT[@]}" update -qq
cd "$WORK"
apt-get "${APT[@]}" download etcd-server
dpkg -x etcd-server_*.deb root
install -m 0755 root/usr/bin/etcd "$CACHE/etcd.tmp" && mv "$CACHE/etcd.tmp" "$CACHE/etcd"
if [[ -x $CACHE/kube-apiserver ]]; then
    echo "[setup] kube-apiserver + etcd: done (etcd $("$CACHE/etcd" --version | head -1))"
    exit 0
fi
apt-get "${APT[@]}" download golang-1.19-go golang-1.19-src rsync libpopt0 \
    golang-github-modern-go-reflect2-dev
for deb in ./*.deb; do dpkg -x "$deb" root; done
apt-get "${APT[@]}" source --download-only "kubernetes=$VERSION"
tar xf kubernetes_*.orig.tar.* 
SRC_DIR=$(find . -maxdepth 1 -type d -name 'kubernetes-*' | head -1)
[[ -n $SRC_DIR ]] || { echo "kubernetes source tree not found" >&2; exit 1; }
# Go >= 1.18 needs reflect2 1.0.2 (the vendored 1.0.1 segfaults on custom resources).
R2=root/usr/share/gocode/src/github.com/modern-go/reflect2
V2=$SRC_DIR/vendor/github.com/modern-go/reflect2
rm -f "$V2"/*.go "$V2"/*.s
cp "$R2"/*.go "$V2/"
cp "$R2"/*.s "$V2/" 2>/dev/null || true
export GOROOT=$WORK/root/usr/lib/go-1.19
export PATH=$GOROOT/bin:$WORK/root/usr/bin:$PATH
export LD_LIBRARY_PATH=$WORK/root/usr/lib/x86_64-linux-gnu:$WORK/root/lib/x86_64-linux-gnu
export CGO_ENABLED=0 GOFLAGS=-mod=vendor GOCACHE=$WORK/gocache
(cd "$SRC_DIR" && make WHAT=cmd/kube-apiserver)
BIN=$(find "$SRC_DIR/_output" -type f -name kube-apiserver | head -1)
[[ -n $BIN ]] || { echo "the build produced no kube-apiserver" >&2; exit 1; }
install -m 0755 "$BIN" "$CACHE/kube-apiserver.tmp" && mv "$CACHE/kube-apiserver.tmp" "$CACHE/kube-apiserver"
echo "[setup] kube-apiserver + etcd: built ($("$CACHE/kube-apiserver" --version 2>&1 | head -1))"
