// Command etcd runs the upstream etcd server (go.etcd.io/etcd/server/v3/etcdmain)
// for the LocalModel e2e control plane. It is the same entry point as etcd's
// own main package; this wrapper only exists so that the server module can be
// built without the go.etcd.io/etcd/v3 root module.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
