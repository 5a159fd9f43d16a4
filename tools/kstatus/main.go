// Command kstatus prints what kstatus (sigs.k8s.io/cli-utils), the library
// behind Flux's and kpt's waits, makes of one object: the JSON object on stdin
// in, {"status": ..., "message": ...} on stdout out. Troupe's tests use it to
// check its status conditions against the real library, not a reading of it.
package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
)

type result struct {
	Status  string `json:"status"`
	Message string `json:"message"`
}

func main() {
	data, err := io.ReadAll(os.Stdin)
	if err != nil {
		fail(err)
	}
	// Unstructured's own decoder keeps integers as int64, as client-go does;
	// encoding/json would make generation a float64, which kstatus refuses.
	var obj unstructured.Unstructured
	if err := obj.UnmarshalJSON(data); err != nil {
		fail(err)
	}
	res, err := status.Compute(&obj)
	if err != nil {
		fail(err)
	}
	if err := json.NewEncoder(os.Stdout).Encode(result{res.Status.String(), res.Message}); err != nil {
		fail(err)
	}
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "kstatus:", err)
	os.Exit(1)
}
