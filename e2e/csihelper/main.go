// objfs-e2e-csihelper stands in for node-driver-registrar and livenessprobe in the e2e cluster (the
// Go module proxy here refuses both). It takes their flags, so the overlay swaps only the image.
//
// Registration (node-driver-registrar's job): ask the CSI socket for the driver's name, then serve the
// kubelet plugin-registration API (k8s.io/kubelet/pkg/apis/pluginregistration/v1) on
// /registration/<name>-reg.sock; the kubelet's plugin watcher finds that socket, calls GetInfo and
// connects to the endpoint it gets back.
// Health (livenessprobe's job, with --health-port): GET /healthz answers 200 iff CSI Probe says ready.
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	csi "github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	reg "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
)

type registration struct {
	reg.UnimplementedRegistrationServer
	name, endpoint string
}

func (r *registration) GetInfo(context.Context, *reg.InfoRequest) (*reg.PluginInfo, error) {
	return &reg.PluginInfo{Type: reg.CSIPlugin, Name: r.name, Endpoint: r.endpoint,
		SupportedVersions: []string{"1.0.0"}}, nil
}

func (r *registration) NotifyRegistrationStatus(_ context.Context, s *reg.RegistrationStatus) (*reg.RegistrationStatusResponse, error) {
	if !s.PluginRegistered {
		// As node-driver-registrar does: a refused registration is fatal, the kubelet restarts us.
		log.Fatalf("kubelet refused the registration: %s", s.Error)
	}
	log.Printf("registered %s with the kubelet", r.name)
	return &reg.RegistrationStatusResponse{}, nil
}

func dial(addr string) *grpc.ClientConn {
	conn, err := grpc.NewClient("unix://"+addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		log.Fatalf("csi socket %s: %v", addr, err)
	}
	return conn
}

func driverName(conn *grpc.ClientConn) string {
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		info, err := csi.NewIdentityClient(conn).GetPluginInfo(ctx, &csi.GetPluginInfoRequest{})
		cancel()
		if err == nil {
			return info.GetName()
		}
		log.Printf("waiting for the CSI driver: %v", err)
		time.Sleep(time.Second)
	}
}

func main() {
	csiAddr := flag.String("csi-address", "/csi/csi.sock", "the CSI driver's socket")
	regPath := flag.String("kubelet-registration-path", "", "the CSI socket's path on the node, for the kubelet")
	regDir := flag.String("plugin-registration-path", "/registration", "the kubelet's plugins_registry, mounted")
	healthPort := flag.Int("health-port", 0, "serve /healthz on this port instead of registering")
	flag.Parse()
	conn := dial(*csiAddr)

	if *healthPort != 0 {
		http.HandleFunc("/healthz", func(w http.ResponseWriter, req *http.Request) {
			ctx, cancel := context.WithTimeout(req.Context(), 5*time.Second)
			defer cancel()
			r, err := csi.NewIdentityClient(conn).Probe(ctx, &csi.ProbeRequest{})
			if err != nil || (r.GetReady() != nil && !r.GetReady().GetValue()) {
				http.Error(w, fmt.Sprintf("probe: %v", err), http.StatusInternalServerError)
				return
			}
			fmt.Fprintln(w, "ok")
		})
		log.Fatal(http.ListenAndServe(fmt.Sprintf(":%d", *healthPort), nil))
	}

	if *regPath == "" {
		log.Fatal("--kubelet-registration-path is required (the CSI socket as the kubelet sees it)")
	}
	name := driverName(conn)
	sock := filepath.Join(*regDir, name+"-reg.sock")
	_ = os.Remove(sock)
	lis, err := net.Listen("unix", sock)
	if err != nil {
		log.Fatalf("listen %s: %v", sock, err)
	}
	srv := grpc.NewServer()
	reg.RegisterRegistrationServer(srv, &registration{name: name, endpoint: *regPath})
	go func() {
		sig := make(chan os.Signal, 1)
		signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
		<-sig
		srv.Stop()
		_ = os.Remove(sock)
		os.Exit(0)
	}()
	log.Printf("serving the registration of %s at %s", name, sock)
	log.Fatal(srv.Serve(lis))
}
